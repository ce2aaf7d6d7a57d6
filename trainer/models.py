"""The paper's model ladder: 3D CNN, symmetric-pair 3D CNN, ResNet-18 on the axial slice.

Every model takes the stored batch ``x (B, 2, P, P, P) uint8`` through its own
``prepare`` (dequantise with the shard manifest's normalisation, then the
view the model wants) and returns logits ``(B, 2)``; softmax gives the
lesion probability. ``ModelConfig`` is saved in every checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from shards.common.views import axial_slice, concat_pair, dequantise, single_cube
from trainer.config import LAYOUTS, MODELS, ModelConfig, ModelError
from trainer.registry import model_entry

__all__ = ["LAYOUTS", "MODELS", "ModelConfig", "ModelError", "build_model", "memory_format"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PatchCNN(nn.Module):
    """5 valid convolutions (max-pool after the first two), then 2 fully connected layers.

    With ``batch_norm`` each convolution is followed by a BatchNorm3d (in
    evaluation it is a per-channel affine map, so the dense twin folds it
    into the convolution). ReLU after the first 6 layers; the last layer gives logits (softmax in
    ``probabilities``). Input channels: 1 (``cnn3d``: cube A; ``concat``:
    the 2P x P x P stack) or 2 (``channels``: cubes A and B).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.view = model_entry(cfg.name).view  # "cube" (cube A) or "pair" (both cubes)
        in_ch = 2 if (self.view == "pair" and cfg.layout == "channels") else 1
        layers: list[nn.Module] = []
        for i, (width, k) in enumerate(zip(cfg.widths, cfg.kernels)):
            layers.append(nn.Conv3d(in_ch, width, k))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm3d(width))
            layers.append(nn.ReLU(inplace=True))
            if i < 2:
                layers.append(nn.MaxPool3d(2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        try:
            with torch.no_grad():  # in evaluation mode: batch norm cannot train on one 1x1x1 sample
                out = self.features.eval()(torch.zeros((1,) + self.input_shape()))
        except RuntimeError:
            out = None
        self.features.train()
        if out is None or min(out.shape[2:]) < 1:
            raise ModelError(f"patch {cfg.patch} is too small for kernels {cfg.kernels} and two 2x poolings")
        self.feature_shape = tuple(out.shape[1:])
        self.fc1 = nn.Linear(math.prod(self.feature_shape), cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, 2)

    def input_shape(self) -> tuple[int, ...]:
        p = self.cfg.patch
        if self.view == "cube":
            return (1, p, p, p)
        return (2, p, p, p) if self.cfg.layout == "channels" else (1, 2 * p, p, p)

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """The input channels this model takes of a ``(B, 2, ...)`` pair: the one place that knows.

        ``cnn3d`` the cube around the voxel only, ``cnn3d-sym`` both cubes;
        for patches (training, patch by patch) and padded tiles (dense) alike.
        """
        return single_cube(x) if self.view == "cube" else x

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, P, P, P) uint8`` -> this model's float input."""
        x = self.channels(dequantise(x, self.cfg.norm))
        return x if self.view == "cube" or self.cfg.layout == "channels" else concat_pair(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class SliceResNet(nn.Module):
    """torchvision ResNet-18 on the P x P axial slice through the voxel, replicated to 3 channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from torchvision.models import resnet18

        self.cfg = cfg
        self.net = resnet18(weights=_imagenet_weights() if cfg.pretrained == "imagenet" else None)
        if cfg.pretrained not in ("imagenet", "none"):
            path = Path(cfg.pretrained)
            if not path.is_file():
                raise ModelError(f"{path}: no such weights file for --pretrained")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except Exception as exc:
                raise ModelError(f"{path}: not a ResNet-18 state dict: {exc}") from None
        self.net.fc = nn.Linear(self.net.fc.in_features, 2)
        if cfg.finetune == "last":
            for name, param in self.net.named_parameters():
                param.requires_grad = name.startswith("fc.")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        s = axial_slice(dequantise(x, self.cfg.norm)).unsqueeze(1).expand(-1, 3, -1, -1)
        return (s - self.mean) / self.std if self.cfg.pretrained == "imagenet" else s.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _imagenet_weights():
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        weights.get_state_dict(progress=False)  # cached in torch's hub dir, or downloaded
    except Exception as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ModelError(
            f"ImageNet weights for ResNet-18 are not cached ({hub}) and could not be downloaded "
            f"({type(exc).__name__}: {exc}); copy the file there, or use --pretrained none or --pretrained PATH"
        ) from None
    return weights


def memory_format(model: nn.Module, channels_last: bool) -> torch.memory_format:
    """The layout to train ``model`` in: channels-last for the 3D CNNs when asked, else PyTorch's default.

    Numbers are the same either way; only their order in memory differs
    (bench/bench_cpu_step.py measures the speed).
    """
    return torch.channels_last_3d if channels_last and isinstance(model, PatchCNN) else torch.contiguous_format


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg`` names, by its registry entry's builder (``PatchCNN`` or ``SliceResNet`` here)."""
    cfg.check()
    return model_entry(cfg.name).build(cfg)


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Lesion probability ``(B,)`` for stored batches ``x (B, 2, P, P, P) uint8``."""
    return torch.softmax(model(model.prepare(x)).float(), dim=1)[:, 1]

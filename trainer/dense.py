"""A ``PatchCNN`` run densely: every voxel of a padded tile classified at once, with the same layers.

``DenseCNN`` holds the ``PatchCNN`` itself (its parameters, batch norm and
all; nothing is copied) and runs its layers fully convolutionally: every
max-pool gets stride 1, every later layer is dilated by the product of the
earlier pooling strides, and the fully connected layers become convolutions
(fc1's kernel is the last feature map) (Giusti et al. 2013; Kamnitsas et
al.'s DeepMedic trains so). Over ``(B, C, N+P-1, N+P-1, N+P-1)`` it gives
logits ``(B, 2, N, N, N)``: at each voxel, exactly the classifier's output for
the patch whose corner is there (the patch centred on the voxel ``(P-1)/2``
further on). Training (``atlas-train fit --objective dense``) and evaluation
(``evaluate.volume``) run this one definition; batch norm is the module's own,
in training or evaluation mode as the ``PatchCNN`` is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import PatchCNN
from trainer.registry import ModelError


class DenseCNN(nn.Module):
    """``PatchCNN`` -> its fully convolutional form, sharing its parameters (``model`` is a submodule)."""

    def __init__(self, model: PatchCNN):
        super().__init__()
        if not isinstance(model, PatchCNN) or model.input_shape()[1:] != (model.cfg.patch,) * 3:
            raise ModelError("only the 3D CNNs in the channels layout run densely: use the patch-by-patch path")
        self.model, self.patch = model, model.cfg.patch
        for m in model.features:
            if not isinstance(m, (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ReLU)):
                raise ModelError(f"no dense form for a {type(m).__name__} layer; use the patch-by-patch path")
        was = model.training
        try:
            with torch.no_grad():
                at = next(model.parameters()).device  # the probe where the model is (a GPU's model on the GPU)
                probe = self.eval()(torch.zeros(1, model.input_shape()[0], *(self.patch + 3,) * 3, device=at)).shape[2:]
        except RuntimeError:
            probe = None
        self.train(was)
        if probe is None or tuple(probe) != (4, 4, 4):
            raise ModelError("this network's pooling does not tile the patch exactly; use the patch-by-patch path")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S, S)`` float model input -> logits ``(B, 2, S-P+1, S-P+1, S-P+1)``."""
        model, dilation = self.model, 1
        for m in model.features:
            if isinstance(m, nn.Conv3d):
                x = F.conv3d(x, m.weight, m.bias, dilation=dilation)
            elif isinstance(m, nn.BatchNorm3d):
                x = m(x)
            elif isinstance(m, nn.MaxPool3d):
                x = F.max_pool3d(x, m.kernel_size, stride=1, dilation=dilation)
                dilation *= m.stride if isinstance(m.stride, int) else m.stride[0]
            else:
                x = F.relu(x, inplace=True)
        channels, *spatial = model.feature_shape
        fc1 = model.fc1.weight.view(model.fc1.out_features, channels, *spatial)
        x = F.relu(F.conv3d(x, fc1, model.fc1.bias, dilation=dilation), inplace=True)
        return F.conv3d(x, model.fc2.weight.view(2, -1, 1, 1, 1), model.fc2.bias)

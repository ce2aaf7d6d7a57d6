"""The trainer's settings: ``TrainConfig`` (a run) and ``ModelConfig`` (a model), their defaults in one place.

Plain dataclasses without torch, so ``atlas-train``'s options take their
defaults from here and ``--help`` stays instant. ``ModelConfig`` is saved in
every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from trainer.objectives import BATCH, LESION_SHARE, OBJECTIVES
from trainer.registry import FIT_MODELS, ModelError, model_entry

MODELS = FIT_MODELS  # what atlas-train fit trains (trainer/registry.py)
LAYOUTS = ("channels", "concat")
OPTIMIZERS = ("adam", "adamw", "sgd")  # sgd: Nesterov momentum 0.99, nnU-Net's (trainer/optim.py)
SCHEDULES = ("constant", "cosine")

# A recipe is the defaults of the optimisation settings; an option given on the
# command line wins over its recipe. ``paper``: the published method (Adam,
# lr 1e-5, constant, no augmentation). ``modern``: AdamW, linear warm-up over
# the first 5% of the run then cosine decay, axis flips of both cubes and
# intensity jitter (``trainer/augment.py``), and batch norm in the 3D CNNs (below); measured in BENCHMARKS.md.
RECIPES = {
    "paper": {"optimizer": "adam", "lr": 1e-5, "schedule": "constant", "warmup": 0.0, "weight_decay": 0.0,
              "augment": False},
    "modern": {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup": 0.05, "weight_decay": 1e-4,
               "augment": True},
}  # fmt: skip

# What a recipe decides about the model: batch norm in the 3D CNNs. ``modern`` has it (measured over 3 seeds in
# BENCHMARKS.md, "Batch norm"); ``paper`` does not. ``fit`` applies it where ``ModelConfig.batch_norm`` is None
# (``ModelConfig.for_recipe``), as ``TrainConfig.resolved`` applies the recipe's other settings.
RECIPE_BATCH_NORM = {"paper": False, "modern": True}
# The shuffle pool's default size in samples, by the shards' format. A blocks record carries every sample of its
# block, up to thousands for one small lesion sampled by component, so a pool of 1,024 made a third of the batches
# a quarter or more one block's (bench/bench_batch_mix.py) and spiked the loss; 65,536 makes such batches rare
# (~260 MB of blocks at 32^3). Pairs records are already mixed at build time, and a pair is 31 kB.
SHUFFLE = {"blocks": 65536, "pairs": 1024}


def shuffle_pool(shuffle: int | None, fmt: str | None, unit: str, units: int, world: int) -> int:
    """The pool a rank's stream draws from, in its units (samples, or blocks for a dense objective): ``shuffle``
    samples (None: ``SHUFFLE``'s for the format ``fmt``), never past the rank's share of the ``units``."""
    pool = SHUFFLE.get(fmt, SHUFFLE["pairs"]) if shuffle is None else shuffle
    pool = pool if unit == "samples" else max(1, pool // 64)  # blocks: ~64 samples a block
    return min(pool, max(1, units // world))  # past a rank's share the pool would hold repeats


def recipe_batch_norm(recipe: str, model: str) -> bool:
    """Whether ``recipe`` puts batch norm into ``model`` (only into models that take it: not ResNet-18)."""
    if recipe not in RECIPE_BATCH_NORM:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPE_BATCH_NORM)}")
    return RECIPE_BATCH_NORM[recipe] and model_entry(model).batch_norm


@dataclass
class TrainConfig:
    shards: str
    out: str
    val_shards: str | None = None
    epochs: int = 1
    steps_per_epoch: int | None = None
    objective: str = "patch"  # trainer/objectives.py: patch, dense, dense-sampled
    batch_size: int | None = None  # samples, or blocks for a dense objective (None: objectives.BATCH)
    voxel_weights: str = "draws"  # --objective dense: each voxel's expected draws, or "share" (one a class)
    lesion_share: float = LESION_SHARE  # --voxel-weights share: lesion voxels' share of the loss's weight (43.7%)
    heavy_repeat: int = 1  # --voxel-weights draws: a block k times the mean weight streamed up to this many times
    recipe: str = "modern"
    lr: float | None = None  # None: the recipe's (as for the five below)
    optimizer: str | None = None
    schedule: str | None = None
    warmup: float | None = None  # share of the run spent warming up
    weight_decay: float | None = None
    augment: bool | None = None
    time_budget: float | None = None  # minutes of training; the schedule then runs on elapsed time
    budget_clock: str = "wall"  # or "cpu": this process's CPU time
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool | None = False  # None: on with the modern recipe where bf16 pays (a GPU, a CPU with bf16), else off
    channels_last: bool = True  # 3D CNNs: channels-last activations (more steps a CPU-second: BENCHMARKS.md)
    compile: bool = False  # torch.compile the training forward (needs a C compiler; compiling takes a while)
    cut_on_device: bool = False
    class_weights: tuple[float, float] | None = None
    clip_grad: float | None = None  # clip the gradient's norm to this (None: no clipping; its norm is logged)
    shuffle: int | None = None  # the shuffle pool in samples (None: SHUFFLE's for the shards' format)
    log_every: int = 10
    eval_every: int | None = None
    val_batches: int | None = None
    checkpoint_every: int = 500
    snapshot_every: int | None = None  # also keep snapshots/step-NNNNNNN.pt (for atlas-evaluate curve)
    timeout: float = 30.0
    retries: int = 3

    def resolved(self) -> TrainConfig:
        """This config with every setting its recipe decides filled in (the ones given kept)."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        given = {k: getattr(self, k) for k in RECIPES[self.recipe] if getattr(self, k) is not None}
        batch = self.batch_size if self.batch_size is not None else BATCH[self.objective]
        return replace(self, **{**RECIPES[self.recipe], **given}, batch_size=batch)


@dataclass
class ModelConfig:
    """Model hyper-parameters plus the preprocessing they were trained with.

    ``name`` is a model of ``trainer/registry.py``. ``widths`` are the 5
    convolutions' output channels, ``kernels`` their (cubic) kernel sizes;
    convolutions are valid (unpadded), max-pooling 2x2x2 after the first two;
    ``batch_norm`` puts a BatchNorm3d between each convolution and its ReLU
    (None: the recipe's, resolved by ``for_recipe`` when ``fit`` starts; a
    model built without a recipe has none). With P=25 and the default kernels
    the feature map ends at 1x1x1: 25 -4-> 22 -pool-> 11 -4-> 8 -pool-> 4 -2-> 3 -2-> 2 -2-> 1.
    """

    name: str = "cnn3d-sym"
    layout: str = "channels"
    patch: int = 25
    widths: tuple[int, ...] = (16, 32, 32, 64, 64)
    kernels: tuple[int, ...] = (4, 4, 2, 2, 2)
    hidden: int = 128
    batch_norm: bool | None = None  # BatchNorm3d after each convolution (evaluation mode for dense prediction)
    pretrained: str = "none"
    finetune: str = "last"
    norm: dict = field(default_factory=lambda: {"method": "histeq", "offset": 0.0, "scale": 1 / 255})

    def check(self) -> None:
        entry = model_entry(self.name)
        if entry.command != "fit":
            raise ModelError(f"{self.name} is trained with atlas-train {entry.command}; fit trains {', '.join(MODELS)}")
        if self.layout not in LAYOUTS:
            raise ModelError(f"unknown layout {self.layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.layout not in entry.layouts:
            takes = ", ".join(e for e in MODELS if self.layout in model_entry(e).layouts)
            raise ModelError(f"the {self.layout} layout is for {takes} only")
        if len(self.widths) != 5 or len(self.kernels) != 5:
            raise ModelError("cnn3d needs exactly 5 widths and 5 kernel sizes")
        if self.finetune not in ("last", "all"):
            raise ModelError("--finetune is 'last' or 'all'")
        if self.batch_norm and not entry.batch_norm:
            takes = ", ".join(e for e in MODELS if model_entry(e).batch_norm)
            raise ModelError(f"--batch-norm is for the 3D CNNs ({takes}); {self.name} takes none")

    def for_recipe(self, recipe: str) -> ModelConfig:
        """This config with batch norm as ``recipe`` decides, where it was not given."""
        if self.batch_norm is not None:
            return self
        return replace(self, batch_norm=recipe_batch_norm(recipe, self.name))

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data.setdefault("batch_norm", False)  # a checkpoint from before the option: trained without
        for key in ("widths", "kernels"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

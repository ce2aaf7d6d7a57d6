"""The models, in one table: a name, what it reads of a stored pair, how it is built and trained, its dense form.

Configuration, the CLIs' choices, evaluation, ``atlas-evaluate compare`` and
the ladder (``bench/ladder.py``) read this table; nothing else branches on a
model's name. Adding a model is its module plus one line here (a worked
example: docs/adding-a-model.md). No torch here: ``--help`` stays instant, and
a builder is named as ``module:attribute``, imported when a model is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

VIEWS = ("pair", "cube", "slice")  # shards.common.views: both cubes, cube A only, cube A's axial slice


class ModelError(ValueError):
    """A model cannot be built as asked (bad config, weights not available)."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the ladder.

    ``view``: what it reads of a ``(2, P, P, P)`` pair. ``builder``:
    ``module:attribute``, called with a ``ModelConfig`` to give the
    ``nn.Module`` (none for a model ``fit`` does not train). ``command``: the
    ``atlas-train`` command that trains it. ``dense``: it runs fully
    convolutionally over a whole volume, exactly (its ``channels`` layout);
    otherwise it is evaluated patch by patch. ``batch_norm``: it takes
    ``--batch-norm`` (the recipe then decides the default). ``layouts``: the
    input layouts it accepts. ``paper_dice``: the paper's test Dice (its
    Figure 10), ``title`` its name there.
    """

    name: str
    title: str
    view: str
    builder: str
    command: str = "fit"
    dense: bool = False
    batch_norm: bool = False
    layouts: tuple[str, ...] = ("channels",)
    paper_dice: float | None = None

    def build(self, cfg):
        """The ``nn.Module`` for ``cfg`` (torch imported here)."""
        if not self.builder:
            raise ModelError(f"{self.name} is trained with atlas-train {self.command}, not built as a network")
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)(cfg)


# In the paper's order (its Figure 10, weakest first): reports and the ladder list them so.
ENTRIES = (
    ModelEntry("rf", "random forest (25x25)", "slice", "", command="rf", paper_dice=0.015),
    ModelEntry("resnet2d", "ResNet-18 (25x25, ImageNet)", "slice", "trainer.models:SliceResNet", paper_dice=0.146),
    ModelEntry("cnn3d", "3D CNN", "cube", "trainer.models:PatchCNN", dense=True, batch_norm=True, paper_dice=0.389),
    ModelEntry(
        "cnn3d-sym",
        "3D CNN + symmetry + histogram equalisation",
        "pair",
        "trainer.models:PatchCNN",
        dense=True,
        batch_norm=True,
        layouts=("channels", "concat"),
        paper_dice=0.499,
    ),
)
REGISTRY = {e.name: e for e in ENTRIES}
FIT_MODELS = tuple(e.name for e in ENTRIES if e.command == "fit")  # what atlas-train fit --model takes


def model_entry(name: str) -> ModelEntry:
    """The registered model ``name``; a ``ModelError`` naming the choices otherwise."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]

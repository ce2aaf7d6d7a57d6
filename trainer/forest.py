"""The random-forest baseline on the flattened 25x25 axial slice (625 features).

Trained with scikit-learn on a bounded sample drawn from the stream, then
saved in a safe format: every tree's node arrays in one ``forest.npz`` (no
pickle); ``ForestModel.predict_proba`` walks them with NumPy and gives the
same probabilities as scikit-learn's ``predict_proba``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.common.atomic import atomic_path, atomic_write_text
from shards.manifest import provenance, sampling_rates
from shards.reader import ShardStream

PAPER = {"n_estimators": 50, "max_depth": 6, "min_samples_split": 2}
GRID = {"n_estimators": [10, 50, 100], "max_depth": [4, 6, 10], "min_samples_split": [2, 10]}
FOREST = "forest.npz"


def slice_features(x: np.ndarray) -> np.ndarray:
    """``(B, 2, P, P, P) uint8`` -> ``(B, P*P) float32``: cube A's axial slice through the voxel."""
    p = x.shape[-1]
    return np.ascontiguousarray(x[:, 0, :, :, p // 2].reshape(len(x), -1), dtype=np.float32)


def collect(
    spec: str, max_samples: int, batch_size: int = 256, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """Up to ``max_samples`` (features, labels) from a shard stream, shuffled; and its manifest."""
    stream = ShardStream(spec, batch_size=batch_size, shuffle=4096, seed=seed)
    xs, ys, n = [], [], 0
    for batch in stream:
        xs.append(slice_features(batch["x"].numpy()))
        ys.append(batch["y"].numpy())
        n += len(ys[-1])
        if n >= max_samples:
            break
    if not xs:
        raise ValueError(f"{spec}: no samples")
    return np.concatenate(xs)[:max_samples], np.concatenate(ys)[:max_samples], stream.manifest


class ForestModel:
    """A fitted forest as plain arrays (``left``, ``right``, ``feature``, ``threshold``, ``proba`` per node)."""

    def __init__(self, arrays: dict[str, np.ndarray], config: dict):
        self.arrays, self.config = arrays, config

    @classmethod
    def from_sklearn(cls, forest, config: dict) -> ForestModel:
        parts = {k: [] for k in ("left", "right", "feature", "threshold", "proba")}
        roots, offset = [], 0
        for est in forest.estimators_:
            t = est.tree_
            internal = t.children_left >= 0
            parts["left"].append(np.where(internal, t.children_left + offset, -1))
            parts["right"].append(np.where(internal, t.children_right + offset, -1))
            parts["feature"].append(np.where(internal, t.feature, 0))
            parts["threshold"].append(t.threshold)
            value = t.value[:, 0, :]
            parts["proba"].append(value / value.sum(axis=1, keepdims=True))
            roots.append(offset)
            offset += t.node_count
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        arrays["left"], arrays["right"] = arrays["left"].astype(np.int64), arrays["right"].astype(np.int64)
        arrays["feature"] = arrays["feature"].astype(np.int64)
        arrays["roots"] = np.asarray(roots, dtype=np.int64)
        arrays["classes"] = np.asarray(forest.classes_, dtype=np.int64)
        return cls(arrays, config)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``(N, 625)`` -> ``(N, n_classes)``: the mean over trees of each leaf's class shares."""
        a = self.arrays
        features = np.asarray(features, dtype=np.float32)
        rows = np.arange(len(features))
        total = np.zeros((len(features), a["proba"].shape[1]))
        for root in a["roots"]:
            node = np.full(len(features), root, dtype=np.int64)
            while True:
                inner = a["left"][node] >= 0
                if not inner.any():
                    break
                go_left = features[rows, a["feature"][node]] <= a["threshold"][node]
                node = np.where(inner, np.where(go_left, a["left"][node], a["right"][node]), node)
            total += a["proba"][node]
        return total / len(a["roots"])

    def lesion_probability(self, x: np.ndarray) -> np.ndarray:
        """Lesion probability ``(B,)`` for stored batches ``x (B, 2, P, P, P) uint8``."""
        proba = self.predict_proba(slice_features(x))
        classes = list(self.arrays["classes"])
        return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(x))

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / FOREST
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **self.arrays)
        atomic_write_text(Path(run_dir) / "config.json", json.dumps(self.config, indent=1))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> ForestModel:
        run_dir = Path(run_dir)
        with np.load(run_dir / FOREST, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(arrays, json.loads((run_dir / "config.json").read_text()))


def train_forest(
    spec: str,
    out: str | Path,
    max_samples: int = 200_000,
    grid: bool = False,
    seed: int = 0,
    val_spec: str | None = None,
    workers: int = -1,
    log=print,
) -> dict:
    """Fit the forest (paper settings, or a 3-fold grid search) and save it to ``out`` (which it owns meanwhile:
    ``shards.common.lock``; a directory holding a trained network is refused)."""
    from shards.common.lock import owned

    if (Path(out) / "last.pt").exists():
        raise ValueError(f"{out}: holds a trained network (last.pt); a run directory holds one model")
    with owned(out, "atlas-train rf"):
        return _train_forest(spec, out, max_samples, grid, seed, val_spec, workers, log)


def _train_forest(spec, out, max_samples: int, grid: bool, seed: int, val_spec, workers: int, log) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV

    from shards.common.scores import confusion, voxel_scores

    features, labels, manifest = collect(spec, max_samples, seed=seed)
    log(f"forest: {len(labels)} samples ({int(labels.sum())} lesion) from {spec}")
    if grid:
        search = GridSearchCV(
            RandomForestClassifier(random_state=seed, n_jobs=workers), GRID, cv=3, scoring="f1", n_jobs=1
        )
        search.fit(features, labels)
        params, forest = search.best_params_, search.best_estimator_
        log(f"grid search: best {params} (F1 {search.best_score_:.3f})")
    else:
        params = dict(PAPER)
        forest = RandomForestClassifier(random_state=seed, n_jobs=workers, **params).fit(features, labels)
    config = {
        "model": {"name": "rf", **params},
        "max_samples": max_samples,
        "samples": int(len(labels)),
        "seed": seed,
        "shards": spec,
        "preprocessing": (
            {
                "norm": manifest["norm"],
                "build": manifest["config"],
                "sampling": sampling_rates(manifest),
                "trained_on": provenance(manifest),
            }
            if manifest
            else None
        ),
    }
    model = ForestModel.from_sklearn(forest, config)
    result = {"params": params, "train_accuracy": float((forest.predict(features) == labels).mean())}
    if val_spec:
        vx, vy, _ = collect(val_spec, max_samples, seed=seed)
        pred = model.predict_proba(vx)[:, list(forest.classes_).index(1)] > 0.5
        result["val"] = {"samples": int(len(vy)), **voxel_scores(**confusion(pred, vy == 1))}
    model.config["result"] = result
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save(out)
    return result

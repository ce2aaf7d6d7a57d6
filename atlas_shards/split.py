"""Seeded, subject-level train/val/test split, stratified by lesion size; fixed once a store holds it."""

from __future__ import annotations

import hashlib
import json

import numpy as np

SPLITS = ("train", "val", "test")
PAPER_COUNTS = (100, 25, 25)


class SplitError(ValueError):
    pass


def split_sizes(n: int, counts: tuple[int, ...] | None, fractions: tuple[float, ...] | None) -> dict[str, int]:
    """How many subjects go to each split (plus ``unassigned``).

    Exact ``counts`` need at least their sum of subjects; the rest stay
    unassigned. ``fractions`` (or, by default, the paper's 100:25:25
    proportions) apply to any number of subjects.
    """
    if counts is not None:
        if len(counts) != 3 or min(counts) < 0:
            raise SplitError(f"--split needs three non-negative counts, got {counts}")
        if sum(counts) > n:
            raise SplitError(
                f"--split {','.join(map(str, counts))} needs {sum(counts)} subjects but only {n} were ingested; "
                "use --split-fractions"
            )
        return {**dict(zip(SPLITS, counts)), "unassigned": n - sum(counts)}
    if fractions is None:
        fractions = tuple(c / sum(PAPER_COUNTS) for c in PAPER_COUNTS)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise SplitError(f"--split-fractions needs three non-negative fractions, got {fractions}")
    f = np.asarray(fractions, dtype=float) / sum(fractions)
    val = int(round(f[1] * n))
    test = int(round(f[2] * n))
    if n >= 3:  # every requested split gets at least one subject
        val = max(val, 1 if f[1] > 0 else 0)
        test = max(test, 1 if f[2] > 0 else 0)
    train = max(n - val - test, 0)
    return {"train": train, "val": val, "test": n - train - val, "unassigned": 0}


def make_split(
    lesion_volumes: dict[str, float],
    seed: int,
    counts: tuple[int, ...] | None = None,
    fractions: tuple[float, ...] | None = None,
) -> dict[str, list[str]]:
    """Assign subjects to splits so each split spans the lesion-size range.

    Subjects are sorted by lesion volume and labels are dealt out in that
    order by largest deficit (each prefix of the ordering holds every split in
    proportion), then shuffled within consecutive blocks: deterministic for a
    seed and stratified by lesion size.
    """
    sizes = split_sizes(len(lesion_volumes), counts, fractions)
    names = [k for k, v in sizes.items() if v > 0]
    target = np.array([sizes[k] for k in names], dtype=float)
    n = len(lesion_volumes)
    order = sorted(lesion_volumes, key=lambda s: (lesion_volumes[s], s))
    given = np.zeros(len(names))
    labels = []
    for k in range(n):
        deficit = target * (k + 1) / n - given
        deficit[given >= target] = -np.inf
        j = int(np.argmax(deficit))
        given[j] += 1
        labels.append(names[j])
    rng = np.random.default_rng(seed)
    block = max(2, int(round(n / max(target.min(), 1)))) if n else 1
    for start in range(0, n, block):
        chunk = labels[start : start + block]
        labels[start : start + block] = [chunk[i] for i in rng.permutation(len(chunk))]
    out: dict[str, list[str]] = {k: [] for k in (*SPLITS, "unassigned")}
    for subject, label in zip(order, labels):
        out[label].append(subject)
    return {k: sorted(v) for k, v in out.items()}


def split_fingerprint(split: dict) -> str:
    """A short hash of which subject is in which split (train, val, test): what a run records of its store."""
    key = json.dumps({k: sorted(split.get(k, [])) for k in SPLITS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def moved_subjects(before: dict, after: dict) -> list[str]:
    """Subjects that a split ``before`` put in train, val or test and ``after`` puts elsewhere, as
    ``"sub (train -> val)"``."""
    old = {s: k for k in SPLITS for s in before.get(k, [])}
    new = {s: k for k in (*SPLITS, "unassigned") for s in after.get(k, [])}
    return [f"{s} ({k} -> {new.get(s, 'gone')})" for s, k in sorted(old.items()) if new.get(s) != k]

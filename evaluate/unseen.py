"""A model is scored on subjects it never trained on, or the report says it was not.

Each run keeps, in its preprocessing record, the subjects its shards came
from and the fingerprint of its store's split (``shards.manifest.provenance``).
``atlas-evaluate run`` refuses a split that holds any of them (naming them)
unless asked to score them anyway, and says in the report what it checked.
"""

from __future__ import annotations

from atlas_shards.split import split_fingerprint
from evaluate.predictors import EvaluateError

ALLOW = "--allow-training-subjects"


def runs_of(pred) -> list:
    """The trained runs behind a predictor: itself, an ensemble's members, a flip-averaged model's inner one."""
    if hasattr(pred, "members"):
        return [r for m in pred.members for r in runs_of(m)]
    if hasattr(pred, "pred"):
        return runs_of(pred.pred)
    return [pred]


def check_unseen(pred, root, scans: list[str], split: str, store_path, allow: bool, log=print) -> dict:
    """Refuse (``EvaluateError``) to score ``split``'s scans when a run trained on any of their subjects, unless
    ``allow`` or the split is ``train``; returns what ``metrics.json`` records of the check."""
    records = [(r.run_dir, (r.preprocessing or {}).get("trained_on")) for r in runs_of(pred)]
    unknown = [str(d) for d, rec in records if not rec or rec.get("subjects") is None]
    if unknown:
        log(f"note: {', '.join(unknown)} record(s) no training subjects (trained before they were kept): not checked")
        return {"checked": False, "runs_without_record": unknown}
    subject_of = root.attrs.get("scans", {})
    here = {subject_of[s] for s in scans if s in subject_of}
    trained = {s for _, rec in records for s in rec["subjects"]}
    overlap = sorted(here & trained)
    fingerprint = split_fingerprint(root.attrs.get("split") or {})
    other = sorted({str(d) for d, rec in records if rec.get("split_fingerprint") not in (None, fingerprint)})
    resplit = f"trained on shards of another split than {store_path}'s ({fingerprint})"
    if overlap and split != "train" and not allow:
        shown = ", ".join(overlap[:6]) + (" ..." if len(overlap) > 6 else "")
        raise EvaluateError(
            f"{store_path}: split {split!r} holds {len(overlap)} subject(s) the model trained on ({shown})"
            + (f"; the model was {resplit}" if other else "")
            + f"; its scores there would be optimistic. Evaluate on a split it did not train on, or pass {ALLOW} "
            "(the report then says so)"
        )
    if other:
        log(f"note: {', '.join(other)} {resplit}")
    if overlap:
        log(f"warning: {len(overlap)} of the {len(here)} subjects scored are training subjects of the model")
    return {
        "checked": True,
        "training_subjects_scored": overlap,
        "split_fingerprint": fingerprint,
        "runs_of_another_split": other,
    }

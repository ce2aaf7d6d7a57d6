"""``atlas-evaluate compare``: the paper's Figure 10 ladder beside this project's reports."""

from __future__ import annotations

import json
from pathlib import Path

from shards.common.tables import cell
from trainer.registry import ENTRIES

# The paper's ladder, from the model registry (in its order): test Dice and name for each model it measured.
PAPER_DICE = {e.name: e.paper_dice for e in ENTRIES if e.paper_dice is not None}
PAPER_NAMES = {e.name: e.title for e in ENTRIES if e.paper_dice is not None}


def _f(v) -> str:
    return cell(v, ".3f", "n/a")


NUMBERS = ("mean_dice", "pooled_dice", "mean_lesion_f1", "precision", "recall")  # a report's, each a number or null


def _metrics(path: Path) -> dict:
    """A report's ``metrics.json``, its keys checked. Raises ValueError naming the file and the key."""
    try:
        m = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: a JSON {type(m).__name__}, not a report's object")
    for key in ("model", "n_subjects", *NUMBERS):
        if key not in m:
            raise ValueError(f"{path}: no {key!r} (not a metrics.json of atlas-evaluate run)")
    if not isinstance(m["model"], str) or isinstance(m["n_subjects"], bool) or not isinstance(m["n_subjects"], int):
        raise ValueError(f"{path}: 'model' must be a name and 'n_subjects' a count")
    for key in NUMBERS:
        if m[key] is not None and (isinstance(m[key], bool) or not isinstance(m[key], (int, float))):
            raise ValueError(f"{path}: {key!r} is {json.dumps(m[key])}, not a number")
    return m


def ladder(report_dirs: list[str | Path]) -> str:
    """A Markdown table: one row per report, the paper's test Dice beside ours."""
    rows = []
    for d in report_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no metrics.json (not an atlas-evaluate run report)")
        rows.append((Path(d), _metrics(path)))
    order = list(PAPER_DICE)
    rows.sort(key=lambda r: order.index(r[1]["model"]) if r[1]["model"] in order else len(order))
    lines = [
        "| model | paper | report | split | scans | mean Dice | paper test Dice | pooled Dice | lesion F1 | "
        "Dice < 5 mL | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, m in rows:
        lines.append(
            f"| {m['model']} | {PAPER_NAMES.get(m['model'], '-')} | `{d}` | {m.get('split')} | {m['n_subjects']} | "
            f"{_f(m['mean_dice'])} | {_f(PAPER_DICE.get(m['model']))} | {_f(m['pooled_dice'])} | "
            f"{_f(m['mean_lesion_f1'])} | {_f(m.get('small_lesion_dice'))} | {_f(m['precision'])} | {_f(m['recall'])} |"
        )
    lines += [
        "",
        "Paper: test Dice on 25 held-out ATLAS R1.1 subjects (its Figure 10). Ours: the reports above; "
        "phantom data is not ATLAS, so compare the ordering, not the values.",
    ]
    return "\n".join(lines) + "\n"

"""``atlas-evaluate compare``: the paper's Figure 10 ladder beside this project's reports."""

from __future__ import annotations

import json
from pathlib import Path

from shards.tables import cell

PAPER_DICE = {"rf": 0.015, "resnet2d": 0.146, "cnn3d": 0.389, "cnn3d-sym": 0.499}
PAPER_NAMES = {
    "rf": "random forest (25x25)",
    "resnet2d": "ResNet-18 (25x25, ImageNet)",
    "cnn3d": "3D CNN",
    "cnn3d-sym": "3D CNN + symmetry + histogram equalisation",
}


def _f(v) -> str:
    return cell(v, ".3f", "n/a")


def ladder(report_dirs: list[str | Path]) -> str:
    """A Markdown table: one row per report, the paper's test Dice beside ours."""
    rows = []
    for d in report_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no metrics.json (not an atlas-evaluate run report)")
        rows.append((Path(d), json.loads(path.read_text())))
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

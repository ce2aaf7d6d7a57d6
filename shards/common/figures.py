"""What every figure of the project shares: colours told apart with any colour vision, and side markers."""

from __future__ import annotations

# Okabe-Ito: orange and blue, distinct for every kind of colour vision; the sequential maps are viridis-like.
TRUTH, PREDICTION = "#E69F00", "#0072B2"
SEQUENTIAL = "viridis"


def mark_sides(ax, width: int) -> None:
    """L and R at the edges of an axial image of the store's canonical RAS grid shown with ``.T`` and
    ``origin="lower"``: x grows to the right, so the patient's left is on the left (neurological convention)."""
    for x, side, align in ((0, "L", "left"), (width - 1, "R", "right")):
        ax.text(x, 1, side, color="white", fontsize=9, fontweight="bold", ha=align, va="bottom")

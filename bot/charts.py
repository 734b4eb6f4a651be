"""The like-rate-per-version chart for ``/tune status`` (a small PNG, matplotlib Agg)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def like_rate_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """A bar chart of like rate per adapter version (``store.like_rate_by_version`` rows).

    Returns None when no reply was rated yet (an empty chart says nothing).
    """
    rated = [r for r in rows if r.get("like_rate") is not None]
    if not rated:
        return None
    # Figure + Agg canvas directly: pyplot keeps global state and picks a GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = ["base" if r["version"] is None else f"v{r['version']}" for r in rated]
    rates = [100.0 * float(r["like_rate"]) for r in rated]
    totals = [int(r.get("likes") or 0) + int(r.get("dislikes") or 0) for r in rated]
    fig = Figure(figsize=(4, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(labels, rates, color="#5865F2")
    for bar, n in zip(bars, totals):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel("liked %")
    ax.set_title("Like rate per version", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

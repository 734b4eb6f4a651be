"""The like-rate-per-version chart for ``/tune status`` (a small PNG, matplotlib Agg)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def label_bars(ax: Any, bars: Any, texts: Sequence[str], top: float = 100.0,
               fontsize: float = 7) -> None:
    """Write ``texts`` on ``bars`` of an axis that ends at ``top`` (a rate's 100%): above a
    bar, or inside it near its top when there is no room above (the axis never goes past
    100% to make room)."""
    for bar, text in zip(bars, texts):
        h = bar.get_height()
        inside = h > 0.8 * top
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, h),
                    xytext=(0, -3 if inside else 2), textcoords="offset points", ha="center",
                    va="top" if inside else "bottom", fontsize=fontsize,
                    color="white" if inside else "black")


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
    label_bars(ax, bars, [f"{r:.0f}%\nn={n}" for r, n in zip(rates, totals)])
    ax.set_ylim(0, 100)
    ax.set_ylabel("liked %")
    ax.set_title("Like rate per version", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

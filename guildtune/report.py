"""Charts for the demo and benchmark reports (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib types
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def matrix_chart(matrix: dict[str, dict[str, float]], path: Path) -> Path:
    """Heatmap of held-out loss: rows are models, columns are guilds' held-out data."""
    rows = list(matrix)
    cols = sorted({c for r in matrix.values() for c in r})
    values = [[matrix[r].get(c, math.nan) for c in cols] for r in rows]
    fig = _figure(1.6 + 1.4 * max(len(cols), 1), 1.0 + 0.55 * max(len(rows), 1))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c} data" for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    finite = [v for row in values for v in row if not math.isnan(v)]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    for j in range(len(cols)):
        column = [values[i][j] for i in range(len(rows)) if not math.isnan(values[i][j])]
        best = min(column) if column else None  # the best model on this guild's data
        for i in range(len(rows)):
            v = values[i][j]
            if not math.isnan(v):
                # viridis_r is light at low values: dark text there, white on dark cells.
                ax.text(j, i, f"{v:.3f}" + (" *" if v == best else ""), ha="center",
                        va="center", color="black" if v < mid else "white", fontsize=9)
    ax.set_title("held-out loss per token (* best on that data)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    return path


def like_rate_chart(rates: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: each guild's like-rate before and after its adapter went live."""
    fig = _figure(1.5 + 1.6 * max(len(rates), 1), 3.2)
    ax = fig.add_subplot()
    names = list(rates)
    for k, (phase, color) in enumerate((("before", "#999999"), ("after", "#2b8cbe"))):
        xs = [i + (k - 0.5) * 0.38 for i in range(len(names))]
        ys = [rates[n].get(phase, 0.0) * 100 for n in names]
        ax.bar(xs, ys, width=0.36, label=phase, color=color)
        for x, y in zip(xs, ys):
            ax.text(x, y + 1, f"{y:.0f}%", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 125)
    ax.set_ylabel("replies liked (%)")
    ax.set_title("simulated members' like-rate")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path

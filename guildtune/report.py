"""Charts for the demo and benchmark reports (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


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


PHASES = (("before", "before (base)"), ("after", "after (own adapter)"))


def like_rate_chart(counts: dict[str, dict[str, tuple[int, int]]], path: Path,
                    phases: tuple[tuple[str, str], ...] = PHASES,
                    title: str = "simulated members' like-rate") -> Path:
    """``like_rate_figure`` saved to ``path``."""
    like_rate_figure(counts, phases, title).savefig(path)
    return path


def like_rate_figure(counts: dict[str, dict[str, tuple[int, int]]],
                     phases: tuple[tuple[str, str], ...] = PHASES,
                     title: str = "simulated members' like-rate") -> Any:
    """Grouped bars: each guild's like-rate in each of ``phases`` (key, legend label), from
    ``counts[guild][phase] = (liked, rated)``; every bar says its rate and its sample size,
    and the axis ends at 100%."""
    from bot.charts import label_bars

    fig = _figure(2.0 + 1.8 * max(len(counts), 1), 3.4)
    ax = fig.add_subplot()
    names = list(counts)
    colors = ("#999999", "#2b8cbe", "#31a354", "#e6550d")
    width = 0.76 / max(len(phases), 1)
    for k, (phase, label) in enumerate(phases):
        xs = [i + (k - (len(phases) - 1) / 2) * width for i in range(len(names))]
        got = [counts[n].get(phase, (0, 0)) for n in names]
        ys = [100 * liked / n if n else 0.0 for liked, n in got]
        bars = ax.bar(xs, ys, width=width * 0.95, label=label, color=colors[k % len(colors)])
        label_bars(ax, bars, [f"{y:.0f}%\n{liked}/{n}" if n else "n=0"
                              for y, (liked, n) in zip(ys, got)], fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("replies liked (%)")
    ax.set_title(f"{title} (liked/rated under each bar's rate)", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(phases), fontsize=8)
    fig.tight_layout()
    return fig


def loss_curve_chart(curves: dict[str, tuple[list[float], int]], path: Path) -> Path:
    """Training loss per step of each run (``label -> (curve, every)``: a point is the mean of
    ``every`` steps, as ``trainer.pipeline.loss_curve`` records it)."""
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    for label, (curve, every) in curves.items():
        ax.plot([every * (i + 1) for i in range(len(curve))], curve, label=label,
                marker="." if len(curve) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss per step (each run's final fit)", fontsize=9)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path

"""The study's curves: one line per rule, the mean over its seeds at each step.

    seed_mean([[(1, 0.5), (2, 0.4)], [(1, 0.7), (2, 0.2)]])   # [(1, 0.6), (2, 0.3)]
    curve_png(path, title, ylabel, {"all": [(1, 0.6), ...], ...})

A step counts only where every seed has a value (a seed with fewer logged steps shortens
the line rather than biasing its mean). 800 x 450 PNGs (plots.curves' size), drawn on
`matplotlib.figure.Figure`: no pyplot state, no display needed.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

from tip_megatron.apps.plots.curves import DPI, FIGSIZE_IN

Curve = Sequence[tuple[int, float]]  # (step, value), steps increasing


def seed_mean(curves: Sequence[Curve]) -> list[tuple[int, float]]:
    """[(step, mean over the seeds)] at the steps every seed has."""
    by_seed = [dict(c) for c in curves]
    steps = sorted(set.intersection(*(set(d) for d in by_seed))) if by_seed else []
    return [(s, statistics.fmean(float(d[s]) for d in by_seed)) for s in steps]


def curve_png(path: Path, title: str, ylabel: str, lines: Mapping[str, Curve],
              scale: float = 1.0) -> Path:
    """One line per label (`scale` multiplies the values, e.g. 100 for %); a marker on
    each point when a line has few of them (evaluations every few steps)."""
    # optional extra [plot]: seed_mean works without matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    ax = fig.subplots()
    for label, curve in lines.items():
        steps, values = [s for s, _ in curve], [scale * v for _, v in curve]
        ax.plot(steps, values, label=label, marker="o" if len(curve) <= 40 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

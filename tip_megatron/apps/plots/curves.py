"""Learning curves of a run from its metrics.jsonl (one JSON object per logged step).

    records = read_metrics("runs/opd/metrics.jsonl")
    figures, notes = curve_figures(records)      # {name: matplotlib Figure}, skipped panels
    paths = save_figures(figures, "runs/opd/plots")

The keys are those `tip_megatron.train.metrics` logs: `loss`, `kept_fraction`,
`q{1..4}_fraction_all|kept`, `mean_{entropy,reverse_kl}_all|kept`, `tokens_per_s`, and
`eval/mean_at_k` when an evaluation ran. A figure whose keys no line has is skipped with a
note; steps that lack a key (eval runs every few steps) are simply not drawn for it.
Figures are built on `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no
display needed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FIGSIZE_IN = (8.0, 4.5)
DPI = 100
"""Every PNG is FIGSIZE_IN * DPI = 800 x 450 pixels."""


@dataclass(frozen=True)
class Panel:
    """One figure: which series to draw (metric key, legend label) and how to label it."""

    name: str
    """File stem of the PNG."""
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    log_y: bool = False


QUADRANT_COLORS = {1: "tab:red", 2: "tab:orange", 3: "tab:purple", 4: "tab:green"}

PANELS = (
    Panel("loss", "Distillation loss (reverse KL on kept tokens)", "loss (nats / kept token)",
          (("loss", "loss"), ("loss_last_update", "loss, last update of the step"))),
    Panel("kept_fraction", "Fraction of response tokens kept", "kept / response tokens",
          (("kept_fraction", "kept fraction"),)),
    Panel("quadrants", "Quadrant shares: all response tokens (solid) vs kept (dashed)",
          "share of tokens",
          tuple((f"q{q}_fraction_{part}", f"Q{q} {part}") for q in (1, 2, 3, 4)
                for part in ("all", "kept"))),
    Panel("signals", "Mean per-token signals: all vs kept", "mean",
          tuple((f"mean_{name}_{part}", f"{name} {part}") for name in ("entropy", "reverse_kl")
                for part in ("all", "kept"))),
    Panel("eval", "Evaluation accuracy", "mean@k", (("eval/mean_at_k", "mean@k"),)),
    Panel("throughput", "Throughput", "response tokens / s", (("tokens_per_s", "tokens/s"),)),
)


def run_panels(records: Sequence[dict]) -> tuple[Panel, ...]:
    """Panels of the keys a run has only sometimes: per teacher (several teachers, keys
    `teacher/<name>/*`) and mean@k per domain (`eval/<value>/mean_at_k`)."""
    keys = {k for r in records for k in r}
    names = sorted({k.split("/")[1] for k in keys if k.startswith("teacher/")})
    groups = sorted({k.split("/")[1] for k in keys if k.startswith("eval/") and k.count("/") == 2})
    panels = []
    if names:
        panels.append(Panel("teachers", "Per teacher: kept fraction (solid), share of the loss (dashed)",
                            "fraction", tuple(s for n in names for s in (
                                (f"teacher/{n}/kept_fraction", f"{n} kept"),
                                (f"teacher/{n}/loss_share", f"{n} loss share"))))),
        panels.append(Panel("teachers_divergence", "Per teacher: mean reverse KL over its response tokens",
                            "nats / token", tuple((f"teacher/{n}/mean_reverse_kl_all", n) for n in names)))
    if groups:
        panels.append(Panel("eval_domains", "Evaluation accuracy per domain", "mean@k",
                            tuple((f"eval/{g}/mean_at_k", g) for g in groups)))
    return tuple(panels)


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics file; a malformed line is a ValueError naming it."""
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({err.msg}); expected one "
                             "JSON object per line as the trainer writes") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' key")
        records.append(record)
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite number under `key`."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def _style(key: str) -> dict:
    if key.startswith("teacher/"):
        return dict(linestyle="--" if key.endswith("_share") else "-")
    for q, color in QUADRANT_COLORS.items():
        if key.startswith(f"q{q}_"):
            return dict(color=color, linestyle="--" if key.endswith("_kept") else "-")
    return dict(linestyle="--" if key.endswith(("_kept", "_last_update")) else "-")


def panel_figure(panel: Panel, records: Sequence[dict]):
    """The figure of one panel, or None when no record has any of its keys."""
    # optional extra [plot]: read_metrics works without matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # optional extra [plot], as above
    from matplotlib.ticker import MaxNLocator  # optional extra [plot], as above

    drawn = [(key, label, *series(records, key)) for key, label in panel.series]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, steps, values in drawn:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                label=label, gid=key, **_style(key))
    ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(drawn) > 4 else 1)
    fig.tight_layout()
    return fig


def curve_figures(records: Sequence[dict]) -> tuple[dict, list[str]]:
    """({panel name: Figure}, notes on the panels skipped for want of keys)."""
    figures, notes = {}, []
    for panel in PANELS:
        fig = panel_figure(panel, records)
        if fig is None:
            keys = ", ".join(k for k, _ in panel.series)
            notes.append(f"skipped {panel.name}.png: no {keys} in the metrics")
        else:
            figures[panel.name] = fig
    for panel in run_panels(records):
        figures[panel.name] = panel_figure(panel, records)
    return figures, notes


def save_figures(figures: dict, out_dir: str | Path) -> list[Path]:
    """Write `<out_dir>/<name>.png` for each figure; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths

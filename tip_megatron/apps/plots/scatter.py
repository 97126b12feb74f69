"""The paper's Figure 2 analogue: per-token normalised student entropy vs reverse KL.

    fig = token_scatter_figure(read_token_dump(path))
    fig.savefig("step_000010.png")

Kept and dropped tokens in two colours (dropped drawn first, underneath), the quadrant
thresholds as lines when the dump carries fixed ones, each quadrant's share of tokens
written in its corner. A weighted rule's dump (a `weight` strictly between 0 and 1 on some
token: tip_soft, propose_verify, a user rule) colours each token with weight > 0 by its
weight (colour bar 0-1, dropped tokens gray), and each corner gives the quadrant's mean
weight (its share of the loss weight, as the study's kept shares) instead of "kept". Reverse KL on a symmetric-log axis: it spans 0 to tens of nats and
is exactly 0 where student and teacher agree.

Imports matplotlib (the plot extra): `plots/cli.py` imports this module only to plot, after
checking that matplotlib is there.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tip_megatron.apps.plots.curves import DPI, FIGSIZE_IN
from tip_megatron.train.dump_file import TokenDump

KEPT_COLOR = "tab:blue"
DROPPED_COLOR = "tab:gray"
WEIGHT_CMAP = "viridis"
_QUADRANT_CORNERS = {1: (0.98, 0.97, "right", "top"), 2: (0.98, 0.03, "right", "bottom"),
                     3: (0.02, 0.97, "left", "top"), 4: (0.02, 0.03, "left", "bottom")}


def token_scatter_figure(dump: TokenDump, max_points: int = 50_000):
    """Scatter of `dump` (at most `max_points`, sampled evenly, so huge dumps stay legible)."""
    if dump.num_tokens == 0:
        raise ValueError(f"token dump of step {dump.step} has no tokens; nothing to plot")
    idx = np.linspace(0, dump.num_tokens - 1, min(max_points, dump.num_tokens)).astype(np.int64)
    h, d, kept = dump.entropy_norm[idx], dump.reverse_kl[idx], dump.kept[idx]
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    weighted = is_weighted(dump)
    if weighted:
        w = dump.weight[idx].astype(np.float64)
        kept = w > 0
    for mask, color, label in ((~kept, DROPPED_COLOR, "dropped"), (kept, KEPT_COLOR, "kept")):
        style = dict(c=w[mask], cmap=WEIGHT_CMAP, vmin=0.0, vmax=1.0) if weighted and label == "kept" \
            else dict(color=color)
        points = ax.scatter(h[mask], d[mask], s=4, alpha=0.5, linewidths=0, gid=label,
                            label=f"{'weighted' if weighted and label == 'kept' else label} "
                                  f"({int(mask.sum())})", **style)
    if weighted:
        fig.colorbar(points, ax=ax, label="loss weight")
    _thresholds(ax, dump)
    _quadrant_shares(ax, dump, weighted)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0.0, max(float(d.max()), dump.div_threshold_nats if
                         math.isfinite(dump.div_threshold_nats) else 0.0, 1e-2) * 3)
    ax.set(xlabel="normalised student entropy  H / log|V|", ylabel="reverse KL (nats)",
           title=f"Tokens of step {dump.step}: entropy vs divergence"
                 f" ({dump.num_tokens} sampled" + (f" of {dump.num_response_tokens})"
                                                   if dump.num_response_tokens >= 0 else ")"))
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8, markerscale=3)
    fig.tight_layout()
    return fig


def is_weighted(dump: TokenDump) -> bool:
    """Whether some token's weight lies strictly between 0 and 1 (not a mask rule's dump)."""
    w = dump.weight
    return bool(((w > 0) & (w < 1)).any())


def _thresholds(ax, dump: TokenDump) -> None:
    if math.isfinite(dump.entropy_threshold):
        ax.axvline(dump.entropy_threshold, color="black", linestyle="--", linewidth=1,
                   gid="entropy_threshold")
    if math.isfinite(dump.div_threshold_nats):
        ax.axhline(dump.div_threshold_nats, color="black", linestyle="--", linewidth=1,
                   gid="div_threshold")


def _quadrant_shares(ax, dump: TokenDump, weighted: bool) -> None:
    # Q1/Q2 are high entropy (right), Q1/Q3 high divergence (top): see tip.quadrants.
    for q, (x, y, ha, va) in _QUADRANT_CORNERS.items():
        in_q = dump.quadrant == q
        share = float(in_q.mean())
        if weighted:
            mean_w = float(dump.weight[in_q].astype(np.float64).mean()) if in_q.any() else math.nan
            text = f"Q{q}: {share:.0%} of tokens, mean weight {mean_w:.2f}"
        else:
            kept_share = float(dump.kept[in_q].mean()) if in_q.any() else math.nan
            text = f"Q{q}: {share:.0%} of tokens, {kept_share:.0%} kept"
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=8, gid=f"Q{q}",
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))

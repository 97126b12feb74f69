"""`tip-megatron plot RUN_DIR [--out DIR]`: PNGs of a run, paths printed one a line.

Reads `RUN_DIR/metrics.jsonl` (learning curves: tip_megatron.apps.plots.curves) and every
`RUN_DIR/token_dumps/step_*.npz` (entropy vs reverse KL scatter: tip_megatron.apps.plots.scatter)
and writes `RUN_DIR/plots/<name>.png` (or under --out). RUN_DIR may also be the metrics
file itself. Needs matplotlib (`pip install 'tip_megatron[plot]'`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

MISSING_MATPLOTLIB = ("error: tip-megatron plot needs matplotlib: install the plot extra "
                      "(pip install 'tip_megatron[plot]', or bash install.sh plot)")


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="PNGs of a run: learning curves, token scatter")
    p.add_argument("run", help="run directory (with metrics.jsonl, token_dumps/) or a metrics.jsonl")
    p.add_argument("--out", help="where the PNGs go (default: <run dir>/plots)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    run = Path(args.run)
    run_dir, metrics = (run.parent, run) if run.is_file() else (run, run / "metrics.jsonl")
    dumps = sorted((run_dir / "token_dumps").glob("step_*.npz"))
    if not metrics.is_file() and not dumps:
        print(f"error: {args.run}: no metrics.jsonl and no token_dumps/step_*.npz there; "
              "expected a run directory (logging.jsonl or checkpoint.dir of a run)",
              file=sys.stderr)
        return 2
    try:
        paths, notes = write_run_plots(metrics, dumps, Path(args.out or run_dir / "plots"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def write_run_plots(metrics: Path, dumps: list[Path], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Write every PNG of a run; returns (paths written, notes on what was skipped)."""
    # lazy: --help imports this module; plotting code loads only to plot
    from tip_megatron.apps.plots.curves import curve_figures, read_metrics, save_figures
    # lazy: imports numpy and matplotlib, which --help must not
    from tip_megatron.apps.plots.scatter import token_scatter_figure
    # lazy: imports numpy, which --help must not
    from tip_megatron.train.dump_file import read_token_dump

    figures, notes = {}, []
    if metrics.is_file():
        records = read_metrics(metrics)
        if records:
            figures, notes = curve_figures(records)
        else:
            notes.append(f"{metrics} is empty: no learning curves")
    else:
        notes.append(f"no {metrics}: no learning curves")
    for path in dumps:
        figures[f"tokens_{path.stem}"] = token_scatter_figure(read_token_dump(path))
    return save_figures(figures, out_dir), notes

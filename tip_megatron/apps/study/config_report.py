"""The report of a config study: final accuracy (mean ± std over seeds), kept shares, curves.

Inputs are each cell's own files, nothing recomputed: `metrics.jsonl` (the trainer's
`loss` every step; `eval/mean_at_k`, `eval/pass_at_k` of the config's validation every
`eval.every` steps, the last one at the last step: the final accuracy) and, when
`logging.dump_tokens_every` is set, `ckpt/token_dumps/step_*.npz` (kept flag and quadrant
per token). Without dumps the kept share per quadrant comes from the metrics' counts:
summed over the steps, num_kept x q_fraction_kept over num_response x q_fraction_all.
The planted cases exist only on the embedded task: no per-case columns here.

Outputs in the study dir: `study.md`, `study.json`, `plots/{loss,accuracy}.png`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from tip_megatron.config import logging_dir
from tip_megatron.apps.plots.curves import read_metrics
from tip_megatron.train.dump_file import DUMP_DIR, read_token_dump
from tip_megatron.apps.study.curves import curve_png, seed_mean
from tip_megatron.apps.study.report import _mean_std, _pct

QUADRANTS = (1, 2, 3, 4)


def _share(kept: float, total: float) -> float:
    return float(kept / total) if total else float("nan")


def kept_from_dumps(paths: Sequence[Path]) -> dict:
    kept, tot = np.zeros(5), np.zeros(5)
    for path in paths:
        d = read_token_dump(path)
        np.add.at(tot, d.quadrant.astype(int), 1)
        np.add.at(kept, d.quadrant.astype(int), d.weight.astype(float))  # 0/1 for a mask rule
    return {f"Q{q}": _share(kept[q], tot[q]) for q in QUADRANTS}


def kept_from_metrics(records: Sequence[dict]) -> dict:
    """Token counts back from the logged fractions (a NaN fraction: nothing to count)."""
    def count(r: dict, q: int, part: str) -> float:
        frac = r.get(f"q{q}_fraction_{part}", float("nan"))
        n = r["num_kept"] if part == "kept" else r["num_response"]
        return 0.0 if math.isnan(frac) else frac * n

    steps = [r for r in records if "num_response" in r]
    return {f"Q{q}": _share(sum(count(r, q, "kept") for r in steps),
                            sum(count(r, q, "all") for r in steps)) for q in QUADRANTS}


def load_cell(cfg) -> dict:
    """One cell's curves, final accuracy and kept shares; ValueError when its metrics lack
    the last step's validation (a run that stopped early)."""
    jsonl = Path(cfg.logging.jsonl)
    records = read_metrics(jsonl)
    last = records[-1] if records else {}
    if last.get("step") != cfg.train.steps or "eval/mean_at_k" not in last:
        raise ValueError(f"{jsonl}: no validation at the last step {cfg.train.steps} (last line: "
                         f"step {last.get('step')}); the run did not finish: rerun the study")
    dumps = sorted((Path(logging_dir(cfg)) / DUMP_DIR).glob("step_*.npz"))
    return {"dir": str(jsonl.parent), "train_seed": cfg.train.seed,
            "loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "accuracy": [(r["step"], r["eval/mean_at_k"]) for r in records if "eval/mean_at_k" in r],
            "final": {"mean_at_k": last["eval/mean_at_k"], "pass_at_k": last["eval/pass_at_k"]},
            "final_loss": last.get("loss", float("nan")),
            "kept": kept_from_dumps(dumps) if dumps else kept_from_metrics(records),
            "kept_source": "token dumps" if dumps else "metrics"}


def aggregate(cells: Sequence[tuple[str, object]]) -> dict:
    """{rule label: {"runs": [...], "final": {mean_at_k, pass_at_k: mean/std}, ...}}."""
    by_rule: dict[str, list[dict]] = {}
    for label, cfg in cells:
        by_rule.setdefault(label, []).append(load_cell(cfg))
    return {label: {
        "runs": rs,
        "final": {k: _mean_std([r["final"][k] for r in rs]) for k in ("mean_at_k", "pass_at_k")},
        "final_loss": _mean_std([r["final_loss"] for r in rs]),
        "kept": {f"Q{q}": _mean_std([r["kept"][f"Q{q}"] for r in rs]) for q in QUADRANTS},
        "kept_source": rs[0]["kept_source"],
    } for label, rs in by_rule.items()}


def markdown(table: dict, config: str, cfg) -> str:
    e = cfg.eval
    k = e.pass_k or e.n
    lines = [f"Config `{config}`, {cfg.train.steps} steps; final accuracy: the validation at the "
             f"last step on {', '.join(e.prompts)} (grader {e.grader}, n={e.n}, temperature "
             f"{e.temperature:g}), mean@{e.n} and pass@{k} (%), mean ± std over seeds.", "",
             f"| rule | seeds | mean@{e.n} | pass@{k} | final loss |", "|---|---|---|---|---|"]
    for label, row in table.items():
        f = row["final"]
        lines.append(f"| {label} | {f['mean_at_k']['n']} | {_pct(f['mean_at_k'])} | "
                     f"{_pct(f['pass_at_k'])} | {row['final_loss']['mean']:.4f} |")
    source = next(iter(table.values()))["kept_source"]
    lines += ["", f"Share of tokens kept (%) per quadrant, over the run (from its {source}):", "",
              "| rule | Q1 | Q2 | Q3 | Q4 |", "|---|---|---|---|---|"]
    for label, row in table.items():
        lines.append("| " + " | ".join([label] + [_pct(row["kept"][f"Q{q}"]) for q in QUADRANTS]) + " |")
    return "\n".join(lines) + "\n"


def plots(table: dict, out_dir: Path, cfg) -> list[Path]:
    loss = {label: seed_mean([r["loss"] for r in row["runs"]]) for label, row in table.items()}
    acc = {label: seed_mean([r["accuracy"] for r in row["runs"]]) for label, row in table.items()}
    return [curve_png(out_dir / "loss.png", "OPD loss (mean over seeds)",
                      "loss (nats / kept token)", loss),
            curve_png(out_dir / "accuracy.png", f"validation mean@{cfg.eval.n} (mean over seeds)",
                      f"mean@{cfg.eval.n} (%)", acc, scale=100)]


def write_report(out: Path, config: str, cells: Sequence[tuple[str, object]]) -> list[Path]:
    """`cells`: (rule label, the cell's effective RunConfig) in grid order."""
    table = aggregate(cells)
    cfg = cells[0][1]
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "study.md", out / "study.json"
    md.write_text(markdown(table, config, cfg))
    js.write_text(json.dumps(table, indent=1))
    return [md, js, *plots(table, out / "plots", cfg)]

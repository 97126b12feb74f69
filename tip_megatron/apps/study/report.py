"""The study's report: accuracy table (mean ± std over seeds), kept shares, curves.

Inputs are each run's own files, nothing recomputed: `result.json` (the quickstart's
greedy accuracy before/after, through the eval path in `quickstart.evaluation`), `metrics.jsonl` (loss per
logged step, and the mid-run exact match `eval/mean_at_k` every few steps) and
`token_dumps/step_*.npz` (per-token kept flag and quadrant). The planted
case of a dumped token is found from its rollout id: the embedded task's prompts of a step
are a pure function of (data seed, step) (`builtin_models.SyntheticPrompts`), or, for a
task that reads a prompt file (`result.json`'s `prompts_file`: the multi task), the
records the trainer's `PromptSampler` picks for that step from the file (one DP rank: the
quickstart's ranks are its TP ranks); a rollout id is the prompt's index in the step's
global batch times `rollout.n`.

The per-case columns are the cases the run's `result.json` lists (`cases`: name and label,
from its task's data module, `apps/quickstart/tasks.py`); a result without them is the addition
task's (A, B, clean).

Outputs in the study dir: `study.md`, `study.json`, `plots/{loss,accuracy}.png`.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tip_megatron.apps.plots.curves import read_metrics
from tip_megatron.train.dump_file import read_token_dump
from tip_megatron.apps.quickstart import task
from tip_megatron.apps.quickstart.evaluation import case_indices
from tip_megatron.data.sampler import PromptSampler
from tip_megatron.apps.quickstart.tasks import DEFAULT_TASK, get_task
from tip_megatron.apps.study.curves import curve_png, seed_mean


def case_columns(result: dict) -> list[tuple[str, str]]:
    """[(case name, label)] of a run's planted cases, in its task's order."""
    cases = result.get("cases") or [[c, task.CASE_LABELS[c]] for c in task.CASES]
    return [(name, label) for name, label in cases]


def _acc_keys(result: dict) -> tuple[str, ...]:
    return ("exact", *result.get("domains", ()), *(name for name, _ in case_columns(result)))


def _data(result: dict):
    return get_task(result.get("task", DEFAULT_TASK)).data


def _mean_std(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def dump_cases(result: dict, step: int, rollout_id: np.ndarray, run: Path | None = None) -> np.ndarray:
    """Planted case index (the task's CASES) of each dumped token of `step` (1-based); `run`:
    the run's directory (where a task's prompt file is)."""
    data = _data(result)
    if result.get("prompts_file"):
        prompts = _file_prompts(str(run / result["prompts_file"]), int(result["prompts_per_step"]),
                                int(result["data_seed"]), step)
    else:
        gen = torch.Generator().manual_seed(int(result["data_seed"]) * 1_000_003 + step - 1)
        prompts = data.sample_prompts(int(result["prompts_per_step"]), gen)
    cases = case_indices(data, prompts).numpy()
    return cases[rollout_id // int(result["samples_per_prompt"])]


@functools.lru_cache(maxsize=4)
def _file_records(path: str) -> torch.Tensor:
    """[N, 8] token ids of a task's prompt file, in file order (its `prompt` texts encoded
    with the embedded tokenizer, as the trainer's PromptDataset does without a chat template)."""
    tok = task.tokenizer()
    with open(path) as f:
        return torch.tensor([tok.encode(json.loads(line)["prompt"]) for line in f if line.strip()])


def _file_prompts(path: str, per_step: int, seed: int, step: int) -> torch.Tensor:
    """[per_step, 8] the prompts of `step` (1-based): the trainer's sampler over the file."""
    records = _file_records(path)
    sampler = PromptSampler(records.shape[0], prompts_per_rank=per_step, seed=seed)
    for _ in range(step - 1):
        next(sampler)
    return records[torch.as_tensor(next(sampler))]


def kept_shares(run: Path, result: dict) -> dict:
    """Share of each quadrant's / planted case's tokens kept, over all of a run's dumps; a
    weighted rule's tokens count with their weight (the share of the loss weight)."""
    names = [name for name, _ in case_columns(result)]
    kept_q, tot_q = np.zeros(5), np.zeros(5)
    kept_c, tot_c = np.zeros(len(names)), np.zeros(len(names))
    for path in sorted((run / "token_dumps").glob("step_*.npz")):
        d = read_token_dump(path)
        np.add.at(tot_q, d.quadrant.astype(int), 1)
        np.add.at(kept_q, d.quadrant.astype(int), d.weight.astype(float))
        cases = dump_cases(result, int(d.step), d.rollout_id, run)
        np.add.at(tot_c, cases, 1)
        np.add.at(kept_c, cases, d.weight.astype(float))
    share = lambda k, t: float(k / t) if t else float("nan")  # noqa: E731
    out = {f"Q{q}": share(kept_q[q], tot_q[q]) for q in (1, 2, 3, 4)}
    out.update({name: share(kept_c[i], tot_c[i]) for i, name in enumerate(names)})
    return out


def accuracy_curve(result: dict, records: Sequence[dict]) -> list[tuple[int, float]]:
    """Exact match per step: before OPD at step 0, the mid-run evaluations, and after OPD
    at the last step when no mid-run evaluation fell on it (the same weights, the same eval)."""
    mid = [(r["step"], r["eval/mean_at_k"]) for r in records if "eval/mean_at_k" in r]
    end = [] if mid and mid[-1][0] == result["steps"] else [(result["steps"], result["after"]["exact"])]
    return [(0, result["before"]["exact"]), *mid, *end]


def load_run(run: Path) -> dict:
    result = json.loads((run / "result.json").read_text())
    records = read_metrics(run / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return {"dir": str(run), "result": result, "loss": loss,
            "accuracy": accuracy_curve(result, records), "kept": kept_shares(run, result)}


def aggregate(runs: Sequence[tuple[str, Path]]) -> dict:
    """{rule label: {"runs": [...], "after"/"before": {key: mean/std}, "kept": {...}}}."""
    by_rule: dict[str, list[dict]] = {}
    for label, path in runs:
        by_rule.setdefault(label, []).append(load_run(Path(path)))
    table = {}
    for label, rs in by_rule.items():
        kept_keys = rs[0]["kept"].keys()
        acc_keys = _acc_keys(rs[0]["result"])
        table[label] = {
            "runs": rs,
            "before": {k: _mean_std([r["result"]["before"][k] for r in rs]) for k in acc_keys},
            "after": {k: _mean_std([r["result"]["after"][k] for r in rs]) for k in acc_keys},
            "final_loss": _mean_std([r["result"]["final_loss"] for r in rs]),
            "kept": {k: _mean_std([r["kept"][k] for r in rs]) for k in kept_keys},
        }
    return table


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown(table: dict) -> str:
    first = next(iter(table.values()))["runs"][0]["result"]
    cases = case_columns(first)
    names = [name for name, _ in cases]
    domains = list(first.get("domains", ()))  # a task with several teachers: one column each
    heads = domains + [f"{name} ({label})" if label else name for name, label in cases]
    lines = [f"Embedded {first.get('task', DEFAULT_TASK)} task, {first['steps']} OPD steps, "
             f"TP={first['tp']}; greedy exact match (%) on the held-out problems after OPD, "
             "mean ± std over seeds.", "", "| rule | seeds | exact | " + " | ".join(heads)
             + " | final loss |", "|---|---|---|" + "---|" * len(heads) + "---|"]
    for label, row in table.items():
        a = row["after"]
        lines.append(f"| {label} | {a['exact']['n']} | " + " | ".join(_pct(a[k]) for k in
                     ("exact", *domains, *names)) + f" | {row['final_loss']['mean']:.4f} |")
    before = first["before"]
    per_case = ", ".join(f"{name} {100 * before[name]:.1f}%" for name in names)
    kept_cols = ["Q1", "Q2", "Q3", "Q4", *names]
    lines += ["", f"Student before OPD: {100 * before['exact']:.1f}% ({per_case}).", "",
              "Share of tokens kept (%), over the run's token dumps, per quadrant and planted case:",
              "", "| rule | " + " | ".join(kept_cols) + " |", "|---|" + "---|" * len(kept_cols)]
    for label, row in table.items():
        k = row["kept"]
        lines.append("| " + " | ".join([label] + [_pct(k[c]) for c in kept_cols]) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, runs: Sequence[tuple[str, Path]]) -> list[Path]:
    table = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "study.md", out / "study.json"
    md.write_text(markdown(table))
    js.write_text(json.dumps(table, indent=1))
    return [md, js, *plots(table, out / "plots")]


def plots(table: dict, out_dir: Path) -> list[Path]:
    """Mean loss per step, and exact match per step (before, during, after OPD), one line
    per rule."""
    loss = {label: seed_mean([r["loss"] for r in row["runs"]]) for label, row in table.items()}
    acc = {label: seed_mean([r["accuracy"] for r in row["runs"]]) for label, row in table.items()}
    return [curve_png(out_dir / "loss.png", "OPD loss (mean over seeds)",
                      "loss (nats / kept token)", loss),
            curve_png(out_dir / "accuracy.png", "held-out exact match during OPD (mean over seeds)",
                      "exact match (%)", acc, scale=100)]

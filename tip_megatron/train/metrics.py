"""Step metrics: reduce over micro-batches and data-parallel ranks, then log.

A JSONL file (one object per step), wandb (offline unless an API key is configured; never
a crash when the package is absent — a warning, and the run goes on) and TensorBoard event
files (`logging.tensorboard`; the package is probed before launch by `tensorboard_probe`,
so a missing one is a one-line error, not a crash mid-run). The console line is
train/progress.py's. Metrics live on the last pipeline stage; the rank that logs is its
TP rank 0 / DP rank 0.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.device import default_backend
from tip_megatron.tip import all_reduce_metric_sums, finalize, sum_metric_sums
from tip_megatron.tip.metrics import finalize_teachers

logger = logging.getLogger(__name__)


def reduce_reports(reports: Sequence[dict], dp_group) -> dict:
    """Sum this rank's micro-batch reports, all-reduce over DP, finalize ratios once."""
    loss = torch.zeros(3, dtype=torch.float64)  # loss_sum, num_kept, weight_sum
    tip_parts, teacher_parts = [], {}
    for r in reports:
        loss += r["distill"].double().cpu()
        tip_parts.append({k[4:]: v.double().cpu() for k, v in r.items() if k.startswith("tip/")})
        for k, v in r.items():  # several teachers: teacher/<name>/<sum>
            if k.startswith("teacher/"):
                name, key = k[8:].rsplit("/", 1)
                teacher_parts.setdefault(name, []).append({key: v.double().cpu()})
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(loss, group=dp_group)
    sums = all_reduce_metric_sums(sum_metric_sums(tip_parts), dp_group) if tip_parts else {}
    # The loss is normalised by the weight sum (== num_kept for a mask), as the gradients are.
    out = {"loss": float(loss[0] / loss[2]) if loss[2] > 0 else float("nan"),
           "loss_sum": float(loss[0]), "num_kept": int(loss[1]), "weight_sum": float(loss[2])}
    out.update({k: float(v) for k, v in finalize(sums).items()} if sums else {})
    if teacher_parts:  # every rank reports every teacher in the same order
        teacher_sums = {}
        for name, parts in teacher_parts.items():
            merged: dict = {}
            for p in parts:
                for key, v in p.items():
                    merged[key] = merged.get(key, 0) + v
            teacher_sums[name] = all_reduce_metric_sums(merged, dp_group)
        out.update(finalize_teachers(teacher_sums))
    return out


def peak_memory_mib() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak RSS (CPU), MiB."""
    if default_backend().is_cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


class MetricsLogger:
    """Console + JSONL + optional wandb, active on one rank only.

    Each JSONL row carries the lineage's `run_id` (set once the run directory is settled,
    train/run_dir.py), so rows of different runs in one file (`logging.jsonl`) never mix
    unseen. The file is opened at the first row: set-up writes nothing."""

    def __init__(self, active: bool, jsonl: Optional[str], use_wandb: bool, project: str,
                 run_name: Optional[str], config: dict, tensorboard: Optional[str] = None) -> None:
        self.active = active
        self.run_id: Optional[str] = None
        self._file = None
        self._wandb = None
        self._tb = None
        self._path = Path(jsonl) if jsonl else None
        if not active:
            return
        if use_wandb:
            self._wandb = _start_wandb(project, run_name, config)
        if tensorboard:
            tensorboard_probe(tensorboard)
            # optional: needs the tensorboard package (probed just above)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        if self._path is not None:
            if self._file is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self._path, "a", encoding="utf-8")
            row = {"step": step, **({"run_id": self.run_id} if self.run_id else {}), **metrics}
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()

    def truncate_after(self, step: int, runs: Optional[set] = None) -> int:
        """Drop the JSONL lines of steps after `step` (a resumed run logs them again, so
        each step appears once) and torn lines. With `runs`, only the rows of those run ids
        (and rows without one) are dropped: other runs' rows in a shared file stay. The
        file is rewritten beside itself and renamed over the old one (a crash leaves the
        old or the new file, whole). Returns the number of lines dropped."""
        if not (self.active and self._path is not None and self._path.is_file()):
            return 0
        if self._file is not None:
            self._file.close()
            self._file = None
        lines = self._path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _keep(line, step, runs)]
        dropped = len(lines) - len(kept)
        if dropped:
            tmp = self._path.with_name(f".{self._path.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        return dropped

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def tensorboard_probe(where: str) -> None:
    """ValueError (one line, naming the package) when `tensorboard` is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(f"logging.tensorboard={where!r}: the `tensorboard` package is not "
                         "installed; pip install tensorboard (or 'tip_megatron[tensorboard]'), "
                         "or set logging.tensorboard=null")


def _keep(line: str, step: int, runs: Optional[set]) -> bool:
    try:
        row = json.loads(line)
        row_step, row_run = int(row["step"]), row.get("run_id")
    except (ValueError, KeyError, TypeError):
        return False  # torn
    return row_step <= step or (runs is not None and row_run is not None and row_run not in runs)


def _start_wandb(project: str, run_name: Optional[str], config: dict):
    try:
        # optional extra [wandb]: absent is a warning, not an error
        import wandb
    except ImportError:
        logger.warning("logging.wandb=true but wandb is not installed "
                       "(`pip install 'tip_megatron[wandb]'`): continuing without wandb")
        return None
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(project=project, name=run_name, config=config)

"""What the logging rank shows while a run trains: per logged step the position, elapsed
time, ETA, where the step's time went, throughput, loss and kept fraction.

    timers = StageTimers(sync=cuda)         # train_step: with timers("rollout"): ...
    bar = TrainProgress(total=cfg.train.steps, start=resumed_step, active=is_logger)
    bar.step(step, metrics, logged=step % log_every == 0)
    bar.checkpoint(path, seconds)           # `checkpoint saved: <path> (3.1 s, 12.5 MiB)`

On a terminal (stdout is a tty) a tqdm bar whose postfix is the step's line; otherwise
(Slurm logs, pipes) one plain line per logged step. The stage names (STAGES) are the
keys `time_<stage>_s` of the step's metrics, so they also reach metrics.jsonl.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from tip_megatron.runtime.progress import fmt_seconds

#: the stages of one step, in order: rollout generation, teacher forward, student
#: forward+backward (scoring pre-pass included), optimizer step.
STAGES = ("rollout", "teacher", "student", "optimizer")


class StageTimers:
    """Seconds per stage of the current step (summed when a stage runs several times)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None) -> None:
        self._sync = sync  # accelerators run asynchronously: wait before reading the clock
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time_{s}_s": self.seconds.get(s, 0.0) for s in STAGES}


def step_line(step: int, total: int, elapsed: float, eta: Optional[float], m: dict) -> str:
    """`step 12/100 | 0m31s elapsed, ETA 3m48s | rollout 1.2s teacher 0.3s ... | ...`."""
    split = " ".join(f"{s} {m.get(f'time_{s}_s', 0.0):.2f}s" for s in STAGES)
    if "time_teacher_wait_s" in m:  # a teacher on its own grid: the student's wait for it
        split += f" (teacher wait {m['time_teacher_wait_s']:.2f}s)"
    eta_text = fmt_seconds(eta) if eta is not None else "?"
    skipped = " | SKIPPED" if m.get("skipped") else ""
    return (f"step {step}/{total} | {fmt_seconds(elapsed)} elapsed, ETA {eta_text} | {split} | "
            f"{m.get('tokens_per_s', 0.0):.1f} tok/s | loss {m.get('loss', float('nan')):.4f} | "
            f"kept {m.get('kept_fraction', float('nan')):.3f}{teachers_text(m)}{skipped}")


def teachers_text(m: dict) -> str:
    """Several teachers: ` | a: tok 0.52 kept 0.48 loss 0.61, b: ...` (each teacher's share of
    the response tokens, its kept fraction, its share of the loss); "" for one teacher."""
    names = sorted({k.split("/")[1] for k in m if k.startswith("teacher/")})
    nan = float("nan")
    parts = [f"{n}: tok {m.get(f'teacher/{n}/tokens_share', nan):.2f} kept "
             f"{m.get(f'teacher/{n}/kept_fraction', nan):.2f} loss {m.get(f'teacher/{n}/loss_share', nan):.2f}"
             for n in names]
    return " | " + ", ".join(parts) if parts else ""


def _source(src) -> str:
    kind = next((k for k in ("builtin", "ckpt", "hf") if getattr(src, k)), None)
    return f"{kind} {getattr(src, kind)}" if kind else "none"


def config_summary(cfg, world_size: int) -> str:
    """One line: what is trained from what, on which layout, for how long, how selected."""
    p = cfg.parallel
    teacher = ""
    students = world_size - sum(t.ranks(p) for t in cfg.teachers or (cfg.teacher,))
    for source in cfg.teachers or (cfg.teacher,):
        if source.own_grid(p):
            t = source.parallel.resolve(p)
            ranks = source.ranks(p) or students
            where = f"{ranks} ranks of its own" if source.separate else "the same ranks"
            name = f"teacher {source.name}" if cfg.teachers else "teacher"
            teacher += f" | {name} tp {t.tp}, pp {t.pp}, dp {ranks // (t.tp * t.pp)} on {where}"
    sources = (", ".join(f"{t.name} {_source(t)} ({', '.join(t.serves) or '-'}"
                         f"{', default' if t.default else ''})" for t in cfg.teachers)
               if cfg.teachers else _source(cfg.teacher))
    return (f"run: student {_source(cfg.student)} <- teacher{'s' if cfg.teachers else ''} {sources} | world "
            f"{world_size} (tp {p.tp}, pp {p.pp}, dp {p.dp(students)}){teacher} | {cfg.train.steps} steps x "
            f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.n} samples | selection "
            f"{cfg.selection.rule} rho {cfg.selection.rho} ({cfg.selection.scope}) | lr "
            f"{cfg.optim.lr} | full config: DEBUG log, <checkpoint.dir>/config.yaml")


def write_effective_config(run_dir: str | Path, text: str) -> Path:
    """`<run_dir>/config.yaml` (temp file + rename: never half written)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class TrainProgress:
    """Console progress of the logging rank (inactive elsewhere: every call is a no-op)."""

    def __init__(self, total: int, start: int = 0, active: bool = True,
                 tty: Optional[bool] = None) -> None:
        self.total, self.start_step, self.active = total, start, active
        self._t0 = time.perf_counter()
        self._bar = None
        if active and (sys.stdout.isatty() if tty is None else tty):
            try:
                # lazy: a bar only on a terminal; plain lines without tqdm
                from tqdm import tqdm
            except ImportError:  # plain lines then
                tqdm = None
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             file=sys.stdout) if tqdm else None

    def eta(self, step: int) -> Optional[float]:
        """Remaining seconds at the mean pace of this launch's steps (resumed ones excluded)."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def step(self, step: int, metrics: dict, logged: bool) -> Optional[str]:
        """Advance to `step`; on a logged step, show its line (returned, for tests)."""
        if not self.active:
            return None
        line = step_line(step, self.total, time.perf_counter() - self._t0, self.eta(step), metrics)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if logged:
                self._bar.set_postfix_str(line.split(" | ", 1)[1], refresh=True)
            return line if logged else None
        if logged:
            print(line, flush=True)
            return line
        return None

    def note(self, text: str) -> None:
        """A line that stays (a checkpoint, a warning): above the bar on a terminal."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def checkpoint(self, path: Path, seconds: float) -> str:
        text = f"checkpoint saved: {path} ({seconds:.1f} s, {fmt_bytes(dir_size_bytes(path))})"
        self.note(text)
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

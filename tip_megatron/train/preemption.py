"""Stop on a signal at a step boundary, saving first: Slurm preemption and time limits.

    stop = StopOnSignal.install(cfg.train.exit_signal)   # before the loop
    if stop.requested(): save(...); stop.report(...); break   # at every step boundary
    stop.close()

Slurm sends SIGTERM at a time limit or preemption (then SIGKILL after `KillWait`), and a
signal of your choice ahead of time with `#SBATCH --signal=USR1@120` (to every task of a
step) or `--signal=B:USR1@120` (to the batch shell, which must pass it on). The handler
only sets a flag; the training loop reads it between steps. Signals may reach ranks at
different times (or only some ranks), so `requested` all-reduces the flag over the world:
every rank sees the same answer at the same step, saves the same checkpoint and exits.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.runtime.signals import parse_signals

logger = logging.getLogger(__name__)

#: Signals a process cannot catch (and so cannot ask to save).


def start_saver_helpers(signals: Sequence[signal.Signals]) -> None:
    """Start dist_checkpointing's results-queue manager (a spawned process, created once
    per process on the first save) with `signals` ignored, which it inherits.

    torchrun passes a SIGTERM on to each worker's whole process group, and Slurm's
    `--signal` reaches every process of a step: a helper that died of that signal would
    make the very save the signal asks for fail (a broken pipe to the manager). Ignoring
    them there leaves the rank alone to decide; the helpers still die with the rank
    (`launch.guard_rank_helpers`)."""
    # heavy: megatron.core takes ~10 s to import; only a run that saves needs it
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        get_write_results_queue()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class StopOnSignal:
    """Flag-setting handlers for `signals`; `requested()` agrees on the flag across ranks."""

    signals: tuple[signal.Signals, ...]
    received: Optional[signal.Signals] = None
    previous: dict = field(default_factory=dict)

    @classmethod
    def install(cls, names: Sequence[str], saving: bool = False) -> "StopOnSignal":
        """saving: the run will save when signalled; start the saver's helper processes now,
        immune to the signals (`start_saver_helpers`)."""
        stop = cls(parse_signals(names))
        if threading.current_thread() is not threading.main_thread():
            return stop  # signal() works in the main thread only: no handlers
        if saving and stop.signals:
            start_saver_helpers(stop.signals)
        stop.previous = {s: signal.signal(s, stop._handle) for s in stop.signals}
        return stop

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self, device: Any = "cpu") -> bool:
        """True on every rank when any rank has received one of the signals (a collective:
        every rank calls it at the same step; nothing is exchanged when no signal is set)."""
        if not self.signals:
            return False
        flag = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and self.received is None:
            self.received = signal.Signals(int(flag.item()))  # another rank's signal
        return bool(flag.item())

    def report(self, step: int, saved: Optional[str], not_saved: str = "checkpoint.dir is not set",
               newest: Optional[str] = None) -> str:
        """The line a stopping run prints (rank 0): the checkpoint saved now, or why none
        was (`not_saved`) and the newest one on disk (`newest`, None: there is none)."""
        name = self.received.name if self.received is not None else "a signal"
        if saved:
            where = f"saved checkpoint {saved}; continue with checkpoint.resume=auto"
        elif newest:
            where = f"nothing saved ({not_saved}); newest checkpoint: {newest}"
        else:
            where = f"nothing saved ({not_saved}); no checkpoint on disk"
        return f"received {name}: stopped after step {step}, {where}; exiting 0"

    def close(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

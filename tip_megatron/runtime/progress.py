"""One progress helper for the commands that loop over many items (convert: tensors,
generate: prompts, eval: samples).

    bar = Progress(total=len(items), desc="converting", unit="tensor")
    for item in items:
        ...
        bar.update()
    bar.close()

A tqdm bar when stderr is a terminal (tqdm is a core dependency), else an INFO log line at
every 10% (and at the end): Slurm logs get a few readable lines, not carriage returns.
Only the process that should report creates an enabled one (rank 0; `enabled=False` elsewhere).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

logger = logging.getLogger("tip_megatron.runtime.progress")


def fmt_seconds(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m` (a value people read at a glance)."""
    s = int(max(0.0, seconds) + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts items; shows a bar on a terminal, logs every 10% otherwise."""

    def __init__(self, total: int, desc: str, unit: str = "item", enabled: bool = True,
                 tty: Optional[bool] = None, log: Optional[logging.Logger] = None) -> None:
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
        self._log = log or logger  # the caller's logger: its level settings apply
        self.enabled = enabled and self.total > 0
        self._every = max(1, self.total // 10)
        self._start = time.perf_counter()
        self._bar = None
        if self.enabled and (sys.stderr.isatty() if tty is None else tty):
            try:
                # lazy: a bar only on a terminal; plain log lines without tqdm
                from tqdm import tqdm
            except ImportError:  # plain lines then
                tqdm = None
            self._bar = tqdm(total=self.total, desc=desc, unit=unit) if tqdm else None

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.done // self._every > before // self._every or self.done >= self.total:
            elapsed = time.perf_counter() - self._start
            self._log.info("%s: %d/%d %ss (%.0f%%, %s)", self.desc, self.done, self.total, self.unit,
                        100.0 * self.done / self.total, fmt_seconds(elapsed))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

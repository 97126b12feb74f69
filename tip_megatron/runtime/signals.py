"""Signals inside one process: SIGTERM / SIGHUP as SystemExit so `finally` and atexit
clean-up run, and the signal-handler bookkeeping the launcher shares."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Sequence

_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def install_handlers(handler: Any, signals: Sequence[int]) -> dict:
    """Set `handler` for `signals`; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signals are delivered to the main thread only: nothing to forward here
    return {s: signal.signal(s, handler) for s in signals}


def restore_handlers(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block `signals` raise SystemExit(128 + signum), as Ctrl-C raises
    KeyboardInterrupt, so `finally` clauses and atexit clean-up run (the default action
    kills the process without either). Main thread only; elsewhere a no-op.

    A handler's exception is lost when the signal lands while a finalizer or weakref
    callback runs (Python prints "Exception ignored" and goes on), so the signal is also
    recorded: `exit_if_signalled` (called where the block waits) and the block's end raise
    it again."""
    previous = install_handlers(_exit_on_signal, signals)
    try:
        yield
    except SystemExit:
        _pending_signals.clear()  # delivered
        raise
    finally:
        restore_handlers(previous)
    exit_if_signalled()


_pending_signals: list[int] = []


def _exit_on_signal(signum: int, _frame: Any) -> None:
    _pending_signals.append(signum)
    raise SystemExit(128 + signum)


def exit_if_signalled() -> None:
    """Raise SystemExit(128 + signum) for a signal `exit_on_signals` caught whose exception
    was swallowed; a no-op otherwise."""
    if _pending_signals:
        signum = _pending_signals[0]
        _pending_signals.clear()
        raise SystemExit(128 + signum)


def signal_names() -> list[str]:
    """Names accepted by `train.exit_signal`."""
    return sorted(s.name for s in signal.Signals if s.name not in _UNCATCHABLE
                  and not s.name.startswith("SIG_") and s.name.startswith("SIG"))


def parse_signals(names: Sequence[str], key: str = "train.exit_signal") -> tuple[signal.Signals, ...]:
    """Signal names -> signals; an unknown or uncatchable name is a one-line ValueError."""
    accepted = signal_names()
    out = []
    for name in names:
        upper = str(name).upper()
        upper = upper if upper.startswith("SIG") else "SIG" + upper
        if upper not in accepted:
            raise ValueError(f"{key}: {name!r} is not a signal a process can catch; accepted: "
                             "names such as SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGINT (any "
                             "catchable signal of this OS but SIGKILL/SIGSTOP), or [] to disable")
        out.append(signal.Signals[upper])
    return tuple(dict.fromkeys(out))

"""How an input error reaches the user: one line, and `--debug` for the traceback.

    code = rank_exit(code, err)          # a rank's last word: printed once, or reported
    code, line = read_rank_reports(dir)  # the launcher, after torchrun has exited

A rank started by `tip-megatron` (the launcher sets `REPORTS_ENV`) writes its exit code
and error line to a small file instead of printing it: the launcher prints the line LAST,
after torchrun's failure dump, and returns the ranks' code (torchrun's own is 1 whatever
its workers said). Under a bare torchrun the FIRST rank to fail prints the line before it
exits (torchrun kills the others at once; they may never get to print), the others stay
quiet (an O_EXCL marker per torchrun agent and port).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

#: set by `--debug` so torchrun ranks started from here show tracebacks too.
DEBUG_ENV = "TIP_MEGATRON_DEBUG"
#: set by the launcher: the run-scoped directory the ranks write their reports into.
REPORTS_ENV = "TIP_MEGATRON_RANK_REPORTS"
#: set by `run_forked`: a nonce naming its job (torchrun's agent pid and port name a
#: torchrun job; a test process forks many jobs).
JOB_ENV = "TIP_MEGATRON_JOB"


def error_line(err: BaseException) -> str:
    """`error: <key or file>: <what is wrong>; <what is accepted>` on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"


_reports: Optional[Path] = None


def claim_rank_reports() -> None:
    """At a rank's entry: take the launcher's report folder from the environment, so that
    processes this rank starts (an HF export's child `tip-megatron`) do not report as it."""
    global _reports
    folder = os.environ.pop(REPORTS_ENV, None)
    if folder:
        _reports = Path(folder)


def rank_exit(code: int, line: str = "") -> int:
    """A rank ends with `code` and (when it failed) one error `line`: report it to the
    launcher, or under a bare torchrun print it if no rank of this job printed one yet.
    Returns `code`."""
    if _reports is not None:
        try:
            _write_report(_reports, code, line)
            return code
        except OSError:
            pass  # the launcher's folder is gone: say it here instead
    if line and _first_to_print():
        print(line, file=sys.stderr, flush=True)
    return code


def _write_report(folder: Path, code: int, line: str) -> None:
    rank = os.environ.get("RANK", "0")
    tmp = folder / f".rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": int(rank), "code": int(code), "line": line}))
    os.replace(tmp, folder / f"rank{rank}.json")


def _first_to_print() -> bool:
    """True for the first caller among the ranks of one torchrun agent (its pid and the
    job's port name the marker); True outside torchrun."""
    if "MASTER_PORT" not in os.environ:
        return True
    job = "-".join(os.environ.get(k, "") for k in ("MASTER_PORT", "TORCHELASTIC_RUN_ID", JOB_ENV))
    marker = Path(tempfile.gettempdir()) / f"tip-megatron-error-{os.getuid()}-{os.getppid()}-{job}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no marker possible: better twice than never
    return True


def read_rank_reports(folder: Path, world_size: int, launcher_code: int) -> tuple[int, Optional[str]]:
    """(exit code, error line or None) of a job of `world_size` ranks that reported into
    `folder`; `launcher_code` is torchrun's own.

    The first rank (by rank) that reported an error line decides both; with no line, the
    highest code the ranks reported when every rank reported one (0 after a preemption
    save, where torchrun itself returns 1), else `launcher_code` (a rank died unreported)."""
    reports = []
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    reports.sort(key=lambda r: r.get("rank", 0))
    failed = [r for r in reports if r.get("line") and r.get("code")]
    if failed:
        return int(failed[0]["code"]), str(failed[0]["line"])
    if len({r.get("rank") for r in reports}) == world_size:
        return max(int(r.get("code", 0)) for r in reports), None
    return launcher_code, None


class PreflightError(ValueError):
    """A bad run input: `where` (dotted key or file), what is wrong, what is accepted."""

    def __init__(self, where: str, what: str, accepted: str = "") -> None:
        self.where, self.what, self.accepted = where, what, accepted
        super().__init__(f"{where}: {what}" + (f"; {accepted}" if accepted else ""))

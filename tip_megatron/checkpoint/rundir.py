"""One owner and one lineage per run directory (`checkpoint.dir`). Plain files, no torch.

    note = acquire_lock(root)              # RunDirLocked (one line naming the holder)
    ...                                    # the launch writes into root
    release_lock(root)                     # only a lock this process holds

The lock (`run.lock`, JSON: host, pid, the process's start time, the command) is created
with O_EXCL. A lock whose holder is dead on this host (no such pid, or the pid now belongs
to a process started later) is stale: it is taken over with a note. A lock written on
another host is honoured unless `break_lock` (this host cannot see that process).

A lineage is a chain of steps: the run that wrote them (`run_id`) and where it branched
from (`parent_run`, `parent_step`, then that run's own ancestors). The directory's
current lineage is `<root>/lineage.json`; each step records the run that wrote it in
`<step>/lineage.json`. A step belongs to a lineage when it was written by the lineage's
run, or by an ancestor at or before the step the chain took from it (`Lineage.owns`).
Former lineages are moved aside, never deleted: `previous/<run_id>/` (an overwrite) and
`branches/<run_id>-after-step_N/` (the steps newer than N when a launch resumed from N).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tip_megatron.checkpoint.layout import (
    BRANCHES, CONFIG, HF_EXPORTS, LINEAGE, LINEAGE_FILES, LOCK, METRICS, PREVIOUS, STEP_RE,
    branch_name, is_step_entry, list_checkpoints, step_number,
)

#: Set by `tip-megatron train` for its ranks: the pid of the launcher that holds the lock.
LAUNCHER_ENV = "TIP_MEGATRON_RUN_LOCK_PID"
#: The run id of steps saved before lineages were recorded.
LEGACY_RUN = "legacy"
#: A lock file younger than this that cannot be read is being written: wait, don't take it.
_TORN_LOCK_S = 5.0


class RunDirLocked(ValueError):
    """Another live launch owns the run directory."""


# ------------------------------------------------------------------ the lock
def _start_time(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch); None when there is none."""
    import psutil  # a dependency of the package; imported here: the launcher's preflight path

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def lock_record(pid: Optional[int] = None, command: str = "") -> dict:
    """What `run.lock` holds for process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    started = _start_time(pid) or time.time()
    return {"host": socket.gethostname(), "pid": pid, "started": started,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "command": command}


def read_lock(root: str | Path) -> Optional[dict]:
    """The lock's record; None when there is no lock; {} when it cannot be read."""
    try:
        data = json.loads((Path(root) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "pid" in data else {}


def _alive(entry: dict) -> bool:
    started = _start_time(int(entry["pid"]))
    # A pid reused by a later process is not the holder (1 s: create_time's resolution).
    return started is not None and abs(started - float(entry.get("started", started))) < 1.0


def lock_state(record: dict) -> str:
    """'live' (its process, or a rank it recorded, runs on this host), 'stale' (all died),
    'foreign' (another host)."""
    if record.get("host") != socket.gethostname():
        return "foreign"
    alive = any(_alive(entry) for entry in (record, *record.get("workers", ())))
    return "live" if alive else "stale"


def add_worker(root: str | Path) -> None:
    """Record this process in the lock as working for its holder (a rank its launcher
    started): the lock stays live while the rank runs, even if the launcher was killed."""
    path = Path(root) / LOCK
    record = read_lock(root)
    if not record:
        return
    me = lock_record()
    record["workers"] = [*record.get("workers", ()), {"pid": me["pid"], "started": me["started"]}]
    tmp = path.with_name(f".{LOCK}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def describe(record: dict) -> str:
    what = f" ({record['command']})" if record.get("command") else ""
    ranks = ", ".join(f"pid {w['pid']}" for w in record.get("workers", ()))
    return (f"pid {record.get('pid')} on host {record.get('host')}, started "
            f"{record.get('started_utc', '?')}{what}" + (f", with its ranks {ranks}" if ranks else ""))


def lock_problem(root: str | Path, *, owner_pid: Optional[int] = None, break_lock: bool = False) -> str:
    """'' when this process may take the lock of `root`; else why not, one line."""
    record = read_lock(root)
    if not record or _is_owner(record, owner_pid):
        return ""
    state = lock_state(record)
    if state == "live" or (state == "foreign" and not break_lock):
        where = " (another host: this one cannot tell whether it still runs)" if state == "foreign" else ""
        accepted = ("wait for it to finish or stop it; a lock left by a dead process on this host is "
                    "taken over by itself")
        if state == "foreign":
            accepted = ("if that launch is over, checkpoint.break_lock=true takes the lock over; "
                        "else wait for it")
        return (f"checkpoint.dir={str(root)!r}: in use by {describe(record)}{where} "
                f"({Path(root) / LOCK}); {accepted}")
    return ""


def _is_owner(record: dict, owner_pid: Optional[int]) -> bool:
    """The lock is ours: this process's, or the launcher's that started this rank."""
    if record.get("host") != socket.gethostname():
        return False
    return int(record["pid"]) in {os.getpid(), owner_pid} and lock_state(record) == "live"


def acquire_lock(root: str | Path, *, owner_pid: Optional[int] = None, break_lock: bool = False,
                 command: str = "") -> str:
    """Take `<root>/run.lock` for this process (`root` is created); '' when taken clean or
    already ours (or `owner_pid`'s), else a note saying whose stale lock was taken over.
    Raises RunDirLocked naming a live holder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, note = root / LOCK, ""
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = read_lock(root)
            if record == {} and time.time() - _mtime(path) < _TORN_LOCK_S:
                time.sleep(0.1)  # being written by its taker
                continue
            if record is None:
                continue  # released meanwhile
            if record and _is_owner(record, owner_pid):
                return ""
            problem = lock_problem(root, owner_pid=owner_pid, break_lock=break_lock)
            if problem:
                raise RunDirLocked(problem)
            note = _take_over(path, record)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(lock_record(command=command), f)
            f.flush()
            os.fsync(f.fileno())
        return note
    raise RunDirLocked(f"checkpoint.dir={str(root)!r}: could not take {path} (other launches "
                       "keep taking it); retry when none runs")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _take_over(path: Path, record: dict) -> str:
    """Remove a stale (or, with break_lock, foreign) lock; the note that says so."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    why = "its process is gone" if record and lock_state(record) == "stale" else (
        "checkpoint.break_lock=true" if record else "it was unreadable")
    held = describe(record) if record else "unknown holder"
    return f"checkpoint.dir: took over the lock {path} of {held} ({why})"


def release_lock(root: str | Path) -> bool:
    """Remove `<root>/run.lock` if this process holds it; True when removed."""
    record = read_lock(root)
    if not record or record.get("host") != socket.gethostname() or int(record["pid"]) != os.getpid():
        return False
    try:
        os.unlink(Path(root) / LOCK)
    except FileNotFoundError:
        return False
    return True


# ------------------------------------------------------------------ lineage
def new_run_id() -> str:
    """`20261206-073000-3fa2`: UTC start time (sortable) and a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class Lineage:
    run_id: str
    parent_run: Optional[str] = None
    parent_step: Optional[int] = None
    ancestors: tuple[tuple[str, int], ...] = field(default=())
    """(run id, last step of it in this chain), nearest first; starts with the parent."""

    def owns(self, run_id: Optional[str], step: int) -> bool:
        run_id = run_id or LEGACY_RUN
        return run_id == self.run_id or any(r == run_id and step <= s for r, s in self.ancestors)

    def runs(self) -> set[str]:
        return {self.run_id, *(r for r, _ in self.ancestors)}

    def branch(self, run_id: str, from_run: Optional[str], from_step: int) -> "Lineage":
        """The lineage of a new run `run_id` resumed from step `from_step` of `from_run`
        (one of this chain's runs, or an outside one)."""
        from_run = from_run or LEGACY_RUN
        chain = [(self.run_id, from_step), *self.ancestors]
        names = [r for r, _ in chain]
        tail = chain[names.index(from_run) + 1:] if from_run in names else []
        ancestors = ((from_run, from_step), *((r, min(s, from_step)) for r, s in tail))
        return Lineage(run_id, from_run, from_step, ancestors)

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "parent_run": self.parent_run,
                "parent_step": self.parent_step, "ancestors": [list(a) for a in self.ancestors]}

    def step_record(self) -> dict:
        """What each step of this run records (`<step>/lineage.json`)."""
        return {"run_id": self.run_id, "parent_run": self.parent_run, "parent_step": self.parent_step}

    @classmethod
    def from_dict(cls, d: dict) -> "Lineage":
        return cls(str(d["run_id"]), d.get("parent_run"), d.get("parent_step"),
                   tuple((str(r), int(s)) for r, s in d.get("ancestors", ())))


def read_lineage(root: str | Path) -> Optional[Lineage]:
    """The directory's current lineage; None when it records none (new or older layout)."""
    path = Path(root) / LINEAGE
    try:
        return Lineage.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable lineage ({err}); accepted: the JSON a run writes "
                         "(move the file away to treat the directory as one of an older layout)") from None


def write_lineage(root: str | Path, lineage: Lineage) -> Path:
    path = Path(root) / LINEAGE
    tmp = path.with_name(f".{LINEAGE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(lineage.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def step_run(step: str | Path) -> str:
    """The run that wrote a step (its lineage.json), LEGACY_RUN when it records none."""
    try:
        return str(json.loads((Path(step) / LINEAGE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return LEGACY_RUN


def owned_checkpoints(root: str | Path, lineage: Optional[Lineage]) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints of `lineage`, the other complete ones), oldest first; with no
    lineage (a directory of the older layout) every checkpoint is owned."""
    found = list_checkpoints(root)
    if lineage is None:
        return found, []
    mine = [p for p in found if lineage.owns(step_run(p), step_number(p))]
    return mine, [p for p in found if p not in mine]


# ------------------------------------------------------------------ moving aside
def fresh_start_problem(root: str | Path, resume: str) -> str:
    """'' unless `root` holds step directories; else the one line that refuses starting a
    new lineage there (`resume`: none, or a step directory of another run directory)."""
    root = Path(root)
    steps = [p.name for p in step_entries(root) if not p.name.startswith(".")]
    if not steps:
        return ""
    current = read_lineage(root)
    run = current.run_id if current else LEGACY_RUN
    return (f"checkpoint.resume={resume}: checkpoint.dir={str(root)!r} holds the steps of run {run} "
            f"({steps[0]} .. {steps[-1]}), which a new lineage would mix with; "
            f"checkpoint.overwrite=true moves them aside into {root / PREVIOUS / run}/ (nothing "
            "is deleted), checkpoint.resume=auto continues them, or use another checkpoint.dir")


def starts_new_lineage(root: str | Path, resume: str) -> bool:
    """A launch with this `checkpoint.resume` starts a new lineage in `root` (none, or a
    step directory that is not one of root's)."""
    if resume == "auto":
        return False
    return resume == "none" or Path(resume).resolve().parent != Path(root).resolve()



def step_entries(root: str | Path) -> list[Path]:
    """Every step directory at the top of `root` (complete, damaged, half-written)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if is_step_entry(p.name)) if root.is_dir() else []


def lineage_entries(root: str | Path) -> list[Path]:
    """What a lineage owns at the top of `root`: its steps and LINEAGE_FILES present. The
    HF export folder counts only when it holds an export of ours (a folder with the
    exporter's marker): folders a user keeps there are not a lineage's to move."""
    # lazy: runtime.atomic imports torch.distributed; the train command's --help imports this module
    from tip_megatron.runtime.atomic import WRITTEN_BY

    root = Path(root)
    named = [root / n for n in LINEAGE_FILES if (root / n).exists()
             and (n != HF_EXPORTS or any((c / WRITTEN_BY).is_file() for c in (root / n).iterdir()))]
    return step_entries(root) + named


def _unique(path: Path) -> Path:
    n, out = 1, path
    while out.exists():
        n += 1
        out = path.with_name(f"{path.name}.{n}")
    return out


def move_aside(root: str | Path, run_id: str) -> Optional[Path]:
    """Move everything of the current lineage into `<root>/previous/<run_id>/` (renames in
    one filesystem: nothing is copied or deleted); None when there was nothing."""
    root = Path(root)
    entries = lineage_entries(root)
    if not entries:
        return None
    dest = _unique(root / PREVIOUS / run_id)
    dest.mkdir(parents=True)
    for entry in entries:
        os.rename(entry, dest / entry.name)
    return dest


def branch_newer(root: str | Path, step: int, run_id: str) -> Optional[Path]:
    """Move the complete checkpoints (and HF exports) newer than `step` into
    `<root>/branches/<run_id>-after-step_N/`, with copies of metrics.jsonl, config.yaml and
    lineage.json as they were; None when no checkpoint is newer. Damaged and half-written
    step directories stay where they are (they belong to no lineage)."""
    root = Path(root)
    newer = [p for p in list_checkpoints(root) if step_number(p) > step]
    hf = root / HF_EXPORTS
    exports = [p for p in hf.iterdir() if (_entry_step(p) or 0) > step] if hf.is_dir() else []
    if not newer:
        return None
    dest = _unique(root / BRANCHES / branch_name(run_id, step))
    dest.mkdir(parents=True)
    for name in (METRICS, CONFIG, LINEAGE):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for entry in newer:
        os.rename(entry, dest / entry.name)
    if exports:
        (dest / HF_EXPORTS).mkdir()
        for entry in exports:
            os.rename(entry, dest / HF_EXPORTS / entry.name)
    return dest


def _entry_step(path: Path) -> Optional[int]:
    """The step of a step entry of any state (`step_N`, `step_N.damaged2`, `.step_N.tmp-x`)."""
    name = path.name.lstrip(".").split(".")[0]
    match = STEP_RE.match(name)
    return int(match.group(1)) if match else None

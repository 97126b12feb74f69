"""The run directory of a launch: who owns it (the lock) and which lineage it continues.

    claim(cfg, groups)                 # set-up, before anything is written (collective)
    plan = plan_resume(cfg, groups)    # what to load, which lineage (collective)
    ... load plan.path ...
    lineage = settle(cfg, plan, groups)  # move a former lineage aside, record this one
    release(cfg)                       # at exit (only the lock this process took)

`tip-megatron train` takes the lock in the launching process (`rundir.LAUNCHER_ENV` tells the
ranks whose it is); under a bare torchrun rank 0 takes it. The rules (docs/checkpoints.md,
"One owner, one lineage"): a fresh start into a directory that holds steps needs
`checkpoint.overwrite=true` and moves the old lineage to `previous/<run_id>/`; a resume
from a step older than the newest moves the newer steps to `branches/`; `resume=auto`
takes the newest step of the directory's current lineage. Nothing is deleted.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from tip_megatron.checkpoint import rundir, training as ckpt
from tip_megatron.checkpoint.layout import list_checkpoints, step_number
from tip_megatron.checkpoint.rundir import LEGACY_RUN, Lineage

logger = logging.getLogger(__name__)

def launcher_pid() -> Optional[int]:
    value = os.environ.get(rundir.LAUNCHER_ENV, "")
    return int(value) if value.isdigit() else None


def _on_rank0(fn: Callable[[], Any], groups) -> Any:
    """`fn()` on global rank 0, its result (or its ValueError, raised) on every rank (one
    broadcast over the world: every rank of the run reads the same directory)."""
    box: list = [None]
    if groups.rank == 0:
        try:
            box = [("ok", fn())]
        except ValueError as err:
            box = [("error", err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def claim(cfg, groups) -> None:
    """Rank 0 takes `<checkpoint.dir>/run.lock` unless the launcher holds it; a live
    holder is a RunDirLocked (a ValueError) on every rank."""
    c = cfg.checkpoint
    if not c.dir:
        return

    def take() -> None:
        note = rundir.acquire_lock(c.dir, owner_pid=launcher_pid(), break_lock=c.break_lock,
                                   command="tip_megatron.train")
        if note:
            logger.warning("%s", note)
        if launcher_pid() is not None:  # the lock outlives a killed launcher while we run
            rundir.add_worker(c.dir)
    _on_rank0(take, groups)


def release(cfg) -> None:
    """Remove the lock if this process took it (the launcher's is the launcher's)."""
    if cfg.checkpoint.dir:
        rundir.release_lock(cfg.checkpoint.dir)


@dataclass
class ResumePlan:
    path: Optional[str]
    """The step to load; None: a fresh start."""
    lineage: Lineage
    """The lineage this launch writes."""
    aside_run: Optional[str] = None
    """Move the directory's former lineage (this run id) to previous/ first."""
    branch_from: Optional[int] = None
    """Move the checkpoints newer than this step to branches/ first."""
    branch_run: str = LEGACY_RUN


def plan_resume(cfg, groups) -> ResumePlan:
    """What this launch loads and which lineage it writes (collective: rank 0 decides)."""
    c = cfg.checkpoint
    current = _on_rank0(lambda: rundir.read_lineage(c.dir) if c.dir else None, groups)
    path = None
    if c.resume == "auto" and c.dir:
        path = ckpt.find_resumable(c.dir, lineage=current)
    elif c.resume not in ("auto", "none"):
        ckpt.check_resumable(c.resume)
        path = Path(c.resume)
    return _on_rank0(lambda: _decide(c, current, path), groups)


def _decide(c, current: Optional[Lineage], path: Optional[Path]) -> ResumePlan:
    new_id = rundir.new_run_id()
    root = Path(c.dir) if c.dir else None
    old_run = current.run_id if current else LEGACY_RUN
    leftovers = bool(root) and bool(rundir.lineage_entries(root))
    if path is None or root is None or Path(path).resolve().parent != root.resolve():
        # A fresh start, or a step from elsewhere: the directory's lineage goes aside (under
        # resume=auto only steps of no lineage of its own can be there: moved, not refused).
        problem = rundir.fresh_start_problem(root, c.resume) if root and c.resume != "auto" else ""
        if problem and not c.overwrite:
            raise ValueError(problem)
        if path is None:
            return ResumePlan(None, Lineage(new_id), old_run if leftovers else None)
        run, step = rundir.step_run(path), step_number(path)
        return ResumePlan(str(path), Lineage(new_id, run, step, ((run, step),)),
                          old_run if leftovers else None)
    run, step = rundir.step_run(path), step_number(path)
    newer = [p for p in list_checkpoints(root) if step_number(p) > step]
    if current is not None and current.owns(run, step) and not newer:
        return ResumePlan(str(path), current)  # the same lineage goes on
    base = current or Lineage(LEGACY_RUN)
    return ResumePlan(str(path), base.branch(new_id, run, step),
                      branch_from=step if newer else None, branch_run=old_run)


def settle(cfg, plan: ResumePlan, groups) -> Lineage:
    """After the load succeeded: move the former lineage or the newer steps aside (rank 0,
    with a warning naming where), record this launch's lineage in the directory."""
    c = cfg.checkpoint
    if not c.dir:
        return plan.lineage

    def move() -> None:
        if plan.aside_run:
            dest = rundir.move_aside(c.dir, plan.aside_run)
            if dest is not None:
                logger.warning("checkpoint.dir: the former run %s (%s) moved aside to %s (nothing "
                               "deleted); this launch starts run %s", plan.aside_run,
                               ", ".join(sorted(p.name for p in dest.iterdir())), dest,
                               plan.lineage.run_id)
        if plan.branch_from is not None:
            dest = rundir.branch_newer(c.dir, plan.branch_from, plan.branch_run)
            if dest is not None:
                moved = sorted(p.name for p in dest.iterdir() if step_number(p) is not None)
                logger.warning("checkpoint.resume=%s: the steps of run %s newer than step %d (%s) "
                               "moved to %s (not deleted); this launch continues as run %s",
                               plan.path, plan.branch_run, plan.branch_from, ", ".join(moved), dest,
                               plan.lineage.run_id)
        rundir.write_lineage(c.dir, plan.lineage)
    _on_rank0(move, groups)
    return plan.lineage

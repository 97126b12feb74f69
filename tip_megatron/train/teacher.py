"""The teacher's part of a run: its contexts for the student's loss path, and, on a rank of
the teacher's own (`teacher.placement: separate`), the serving loop: build and load the
teacher on its grid, hand its output weight to the student's last stage, then score each
step's rollouts until the student says stop.

The teacher's own ranks come after the student's in the job (world = student ranks +
teacher ranks) and have a world of their own (their megatron state and collectives never
meet the student's); `distill.teacher_link` carries rollouts in and hidden states out.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

import torch

from tip_megatron.config import RunConfig
from tip_megatron.distill.spec import MicrobatchContext
from tip_megatron.distill.step import (
    Microbatch, ScheduleShape, make_contexts, teacher_hidden_states, teacher_output_weight,
)
from tip_megatron.distill.routing import teacher_ids_of_rows
from tip_megatron.distill.teacher_config import separate_teachers, teachers_of
from tip_megatron.distill.teacher_link import TeacherRankLost
from tip_megatron.distill.teachers import routed_contexts
from tip_megatron.runtime import parallel
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.errors import rank_exit
from tip_megatron.train.preemption import StopOnSignal
from tip_megatron.train.preflight import preflight
from tip_megatron.train.run_state import Run
from tip_megatron.train.setup import build_models

logger = logging.getLogger(__name__)

#: Exit code of a teacher rank whose student went away without saying stop.
EXIT_STUDENT_LOST = 5


def serve_teacher(cfg: RunConfig, split: parallel.Split) -> int:
    """Serve until the student's stop; returns the number of steps scored."""
    checked = preflight(cfg, rank_env().world_size)  # the same checks as the student's ranks
    world = split.world(rank_env().rank)
    index = separate_teachers(cfg)[world]  # this rank's teacher: the world it is in
    source = teachers_of(cfg)[index]
    layout = source.parallel.resolve(cfg.parallel)
    groups = parallel.initialize(layout, seed=cfg.train.seed, split=split)
    # A preemption signal: the teacher keeps scoring (recorded, not acted on) and tells the
    # student's rank 0 after the step; the student's ranks agree on it, save, and say stop.
    signals = StopOnSignal.install(cfg.train.exit_signal)
    side = build_models(cfg, None, checked, teacher_groups={index: groups}).teachers[index]
    if groups.rank == 0:
        logger.info("teacher %s, ranks %d-%d: tp %d, pp %d, dp %d, serving the student's %d ranks",
                    side.name, split.offset(world), split.offset(world) + split.size(world) - 1,
                    layout.tp, layout.pp,
                    groups.dp_size, split.student)
    steps = 0
    try:
        while True:
            side.link.signal = int(signals.received or 0)  # told to the student after the step
            if not side.link.serve_once(side.chunks):
                break
            steps += 1
    except TeacherRankLost as err:
        raise SystemExit(rank_exit(EXIT_STUDENT_LOST, f"tip-megatron train: teacher rank "
                                   f"{rank_env().rank}: {err}")) from None
    finally:
        signals.close()
    return steps


# ------------------------------------------------------------------ the student's side
def teacher_names(cfg: RunConfig) -> tuple[str, ...]:
    """Names of the teachers when there are several (they name the per-teacher metrics); ()
    for one."""
    teachers = teachers_of(cfg)
    return tuple(t.name for t in teachers) if len(teachers) > 1 else ()


def row_teachers(run: Run, device) -> Optional[torch.Tensor]:
    """[rows] int64 teacher of each rollout row of this step (several teachers); None: one."""
    if len(run.models.teachers) == 1:
        return None
    prompt_teachers = run.prompts.teachers()  # prompt files (validate_teachers), routed when read
    return teacher_ids_of_rows(prompt_teachers, run.cfg.rollout.n).to(device)


def teacher_contexts(run: Run, mbs: list[Microbatch],
                     shape: ScheduleShape) -> list[Optional[MicrobatchContext]]:
    """The teachers' forward-only passes: per micro-batch contexts (last stage; None
    elsewhere). A teacher on a grid of its own scores through its link (its hidden states
    may still be on their way when the student pass starts: the loss path waits for each).
    Several teachers: each scores only its own rows, packed into micro-batches of its own
    (`distill.teachers`)."""
    if len(run.models.teachers) > 1:
        return routed_contexts(run.models.teachers, run.groups, mbs, shape)
    link = run.models.link
    if link is not None:
        pending = link.exchange(mbs, run.models.teacher)
        return make_contexts(run.groups, mbs, pending, run.models.teacher_weight)
    hidden = teacher_hidden_states(run.models.teacher, run.groups, mbs, **shape._asdict())
    t_weight = teacher_output_weight(run.models.teacher) if run.groups.is_last_stage else None
    return make_contexts(run.groups, mbs, hidden, t_weight)


def teacher_signal(state: Run, signalled: StopOnSignal) -> None:
    """Under `separate`: a stop signal that reached only a teacher's ranks counts as this
    rank's (rank 0 hears of it from each such teacher; `requested` then spreads it)."""
    links = state.models.separate_links()
    if not links:
        return
    sig = max(link.teacher_signal() for link in links)
    if sig and signalled.received is None:
        signalled.received = signal.Signals(sig)


def link_metrics(run: Run) -> dict:
    """The step's wait for teacher hidden states (inside the student stage) and the bytes
    of them this rank received, over every teacher's link; {} on one grid. Read and reset
    each step."""
    links = [t.link for t in run.models.teachers if t.link is not None]
    if not links:
        return {}
    out = dict(time_teacher_wait_s=sum(link.wait_s for link in links),
               teacher_hidden_mib=sum(link.received_bytes for link in links) / 2**20)
    for link in links:
        link.wait_s, link.received_bytes = 0.0, 0
    return out

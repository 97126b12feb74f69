"""A rank of the teacher's own (`teacher.placement: separate`): build and load the teacher on
its grid, hand its output weight to the student's last stage, then score each step's
rollouts until the student says stop.

The teacher's ranks come after the student's in the job (world = student ranks + teacher
ranks) and have a world of their own (their megatron state and collectives never meet the
student's); `distill.teacher_link` carries rollouts in and hidden states out.
"""
from __future__ import annotations

import logging

from tip_megatron.config import RunConfig
from tip_megatron.distill.teacher_link import TeacherRankLost
from tip_megatron.runtime import parallel
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.errors import rank_exit
from tip_megatron.train.preemption import StopOnSignal
from tip_megatron.train.preflight import preflight
from tip_megatron.train.setup import build_models

logger = logging.getLogger(__name__)

#: Exit code of a teacher rank whose student went away without saying stop.
EXIT_STUDENT_LOST = 5


def serve_teacher(cfg: RunConfig, split: parallel.Split) -> int:
    """Serve until the student's stop; returns the number of steps scored."""
    checked = preflight(cfg, rank_env().world_size)  # the same checks as the student's ranks
    layout = cfg.teacher.parallel.resolve(cfg.parallel)
    groups = parallel.initialize(layout, seed=cfg.train.seed, split=split)
    # A preemption signal reaches every rank: the student saves after its step and then says
    # stop; the teacher keeps scoring until then (recorded, not acted on).
    signals = StopOnSignal.install(cfg.train.exit_signal)
    models = build_models(cfg, None, checked, teacher_groups=groups)
    if groups.rank == 0:
        logger.info("teacher ranks %d-%d: tp %d, pp %d, dp %d, serving the student's %d ranks",
                    split.student, split.student + split.teacher - 1, layout.tp, layout.pp,
                    groups.dp_size, split.student)
    steps = 0
    try:
        while models.link.serve_once(models.teacher):
            steps += 1
    except TeacherRankLost as err:
        raise SystemExit(rank_exit(EXIT_STUDENT_LOST, f"tip-megatron train: teacher rank "
                                   f"{rank_env().rank}: {err}")) from None
    finally:
        signals.close()
    return steps

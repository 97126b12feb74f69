"""`tip-megatron train --config run.yaml [key=value ...] [--nproc N]`.

Under torchrun (`torchrun --nproc_per_node 4 -m tip_megatron.train --config run.yaml ...`)
every process runs the trainer directly (`tip_megatron.train.main`). From a plain shell,
`--nproc N` starts N local ranks through torchrun itself (default: parallel.tp * parallel.pp,
plus the teacher's own ranks under `teacher.placement: separate`).
"""
from __future__ import annotations

import argparse
import logging
import os

from tip_megatron.apps import launch
from tip_megatron.checkpoint import rundir
from tip_megatron.runtime.env import under_torchrun
from tip_megatron.train.main import add_arguments, worker


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="on-policy distillation with TIP token selection",
        epilog="Config keys (type, default, meaning): tip-megatron config doc, or docs/config.md; "
               "the effective config: tip-megatron config show --config X [key=value ...]")
    add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # heavy: the config sections import torch; --help imports this module
    from tip_megatron.config import load_config
    from tip_megatron.distill.teacher_config import teacher_ranks  # as above
    from tip_megatron.train.preflight import preflight  # as above

    cfg = load_config(args.config, args.overrides)  # errors surface before any launch
    if under_torchrun():
        return worker(args.config, args.overrides)
    # the student's tp x pp, plus the teacher's own ranks under teacher.placement=separate
    nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp + teacher_ranks(cfg)
    preflight(cfg, nproc, records=True)  # a bad input stops here (one line, exit 2), before any rank starts
    worker_args = (["--config", args.config] if args.config else []) + list(args.overrides)
    if not cfg.checkpoint.dir:
        return launch.run_local(nproc, "tip_megatron.train", worker_args)
    return _run_holding_lock(cfg, nproc, worker_args)


def _run_holding_lock(cfg, nproc: int, worker_args: list[str]) -> int:
    """The launcher owns checkpoint.dir while its ranks run (`run.lock`; a live holder is
    one line, exit 2, before any rank starts); the ranks know the lock is their launcher's."""
    c = cfg.checkpoint
    note = rundir.acquire_lock(c.dir, break_lock=c.break_lock, command="tip-megatron train")
    if note:
        logging.getLogger(__name__).warning("%s", note)
    os.environ[rundir.LAUNCHER_ENV] = str(os.getpid())
    try:
        return launch.run_local(nproc, "tip_megatron.train", worker_args)
    finally:
        os.environ.pop(rundir.LAUNCHER_ENV, None)
        rundir.release_lock(c.dir)

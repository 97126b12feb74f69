"""A training rank's entry point: `python -m tip_megatron.train --config run.yaml [key=value ...]`
(what `tip-megatron train` and torchrun start on every rank)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tip_megatron.runtime.env import rank_env, under_torchrun
from tip_megatron.runtime.errors import DEBUG_ENV, claim_rank_reports, error_line, rank_exit
from tip_megatron.runtime.processes import die_with_torchrun, guard_rank_helpers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see examples/)")
    p.add_argument("--nproc", type=int, default=0,
                   help="local ranks to start when not under torchrun (default tp*pp)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")


def worker(config: str | None, overrides: list[str]) -> int:
    # heavy (torch, megatron): only a rank runs this; the train command's --help imports this module
    from tip_megatron.runtime import parallel
    from tip_megatron.config import load_config  # as above
    # heavy (torch, megatron): only a rank runs this; the train command's --help imports this module
    from tip_megatron.runtime.device import quiet_third_party_warnings
    from tip_megatron.train.trainer import run  # as above

    guard_rank_helpers()  # this rank's helper processes die with it
    quiet_third_party_warnings()
    try:
        run(load_config(config, overrides))
    finally:
        parallel.destroy()
    return 0


def _main_module() -> int:
    if under_torchrun():
        die_with_torchrun()  # first: a SIGKILLed torchrun leaves no rank behind
        claim_rank_reports()
    parser = argparse.ArgumentParser(prog="python -m tip_megatron.train")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args()
    rank0 = rank_env().rank == 0
    # Rank 0 is the one that prints progress: its INFO lines are the run's console.
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO dumps whole configs
    try:
        return rank_exit(worker(args.config, args.overrides))
    except ValueError as err:  # bad input: every rank stops; one line says why, printed once
        if args.debug or os.environ.get(DEBUG_ENV):
            raise
        return rank_exit(2, error_line(err))


if __name__ == "__main__":
    sys.exit(_main_module())

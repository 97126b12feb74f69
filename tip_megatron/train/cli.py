"""`tip-megatron train --config run.yaml [key=value ...] [--nproc N]`.

Under torchrun (`torchrun --nproc_per_node 4 -m tip_megatron.train --config run.yaml ...`)
every process runs the trainer directly. From a plain shell, `--nproc N` starts N local
ranks through torchrun itself (default: parallel.tp * parallel.pp).
"""
from __future__ import annotations

import argparse
import os
import sys

from tip_megatron import launch


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="on-policy distillation with TIP token selection",
        epilog="Config keys (type, default, meaning): tip-megatron config doc, or docs/config.md; "
               "the effective config: tip-megatron config show --config X [key=value ...]")
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see examples/)")
    p.add_argument("--nproc", type=int, default=0,
                   help="local ranks to start when not under torchrun (default tp*pp)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")


def main(args: argparse.Namespace) -> int:
    from tip_megatron.config import load_config
    from tip_megatron.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)  # errors surface before any launch
    if launch.under_torchrun():
        return worker(args.config, args.overrides)
    nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp
    preflight(cfg, nproc)  # a bad input stops here (one line, exit 2), before any rank starts
    worker_args = (["--config", args.config] if args.config else []) + list(args.overrides)
    return launch.run_local(nproc, "tip_megatron.train", worker_args)


def worker(config: str | None, overrides: list[str]) -> int:
    from tip_megatron import parallel
    from tip_megatron.config import load_config
    from tip_megatron.platform import quiet_third_party_warnings
    from tip_megatron.train.trainer import run

    launch.guard_rank_helpers()  # this rank's helper processes die with it
    quiet_third_party_warnings()
    try:
        run(load_config(config, overrides))
    finally:
        parallel.destroy()
    return 0


def _main_module() -> int:
    import logging

    from tip_megatron.cli import DEBUG_ENV, error_line

    parser = argparse.ArgumentParser(prog="python -m tip_megatron.train")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="tracebacks for input errors")
    args = parser.parse_args()
    rank0 = launch.rank_env().rank == 0
    # Rank 0 is the one that prints progress: its INFO lines are the run's console.
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO dumps whole configs
    try:
        return worker(args.config, args.overrides)
    except ValueError as err:  # bad input: every rank stops, rank 0 says why in one line
        if args.debug or os.environ.get(DEBUG_ENV):
            raise
        if rank0:
            print(error_line(err), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(_main_module())

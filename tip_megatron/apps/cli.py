"""`tip-megatron` command line: one subcommand per module.

    tip-megatron demo | quickstart | train | generate | convert | config | plot ...

Each subcommand lives beside the code it drives and exposes `register(subparsers)`, which
adds its parser and sets `func` to a callable taking the parsed args and returning an exit
code. Modules are imported lazily so `tip-megatron --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from tip_megatron.runtime.errors import DEBUG_ENV, claim_rank_reports, error_line, rank_exit

#: subcommand module paths, in help order.
SUBCOMMAND_MODULES = (
    "tip_megatron.apps.demo",
    "tip_megatron.apps.quickstart",
    "tip_megatron.apps.train_cmd",
    "tip_megatron.apps.generate_cmd",
    "tip_megatron.apps.convert_cmd",
    "tip_megatron.apps.config_cmd",
    "tip_megatron.apps.plan_cmd",
    "tip_megatron.apps.plots.cli",
    "tip_megatron.apps.eval_cmd",
    "tip_megatron.apps.study",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tip-megatron",
        description="On-policy distillation with TIP token selection on megatron-core.",
    )
    parser.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input errors (also in torchrun ranks)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency inside the module
                raise
            continue  # subcommand not built yet
        module.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # --help and usage errors exit here, before torch loads
    args.argv = argv  # for commands that start their own ranks (run_cli_ranks)
    from tip_megatron.runtime.env import under_torchrun  # after parse_args: --help stays fast
    # after parsing: --help and usage errors must not load torch
    from tip_megatron.runtime.processes import die_with_torchrun, guard_rank_helpers

    ranked = under_torchrun()
    if ranked:  # one rank of a torchrun job: die with torchrun, helpers with this rank
        die_with_torchrun()
        claim_rank_reports()
        guard_rank_helpers()
    # after parsing: --help and usage errors must not load torch
    from tip_megatron.runtime.device import quiet_third_party_warnings

    quiet_third_party_warnings()
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLogger().level > logging.DEBUG:  # megatron's INFO dumps whole configs
        logging.getLogger("megatron").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        code, line = int(args.func(args) or 0), ""
    except (ValueError, FileNotFoundError) as err:  # bad input, not a bug: one line, exit 2
        if args.debug:
            raise
        code, line = 2, error_line(err)
    if ranked:  # to the launcher, or printed by the first rank that fails
        return rank_exit(code, line)
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`tip-megatron demo`: a tiny Llama-style model trained for a few steps at TP=2 x PP=2.

Shows that the real megatron-core stack (GPTModel, 1F1B pipeline schedule, DDP, the
distributed optimizer) runs on this machine, CPU or GPU, through torchrun. Each step prints
the loss and grad norm. The ranks run `demo_worker.py`; this module only registers the
command (`tip-megatron --help` imports it and must not import torch).
"""
from __future__ import annotations

import argparse

from tip_megatron.apps.launch import run_local
from tip_megatron.runtime.env import under_torchrun


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="TP=2 x PP=2 forward/backward demo on a tiny model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if under_torchrun():
        # lazy: the worker imports torch and megatron; --help imports this module
        from tip_megatron.apps.demo_worker import run_worker

        return run_worker(args.tp, args.pp, args.steps)
    worker_args = ["--tp", str(args.tp), "--pp", str(args.pp), "--steps", str(args.steps)]
    return run_local(args.tp * args.pp, "tip_megatron.apps.demo_worker", worker_args)

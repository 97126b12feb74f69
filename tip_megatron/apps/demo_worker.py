"""What one rank of `tip-megatron demo` runs (`python -m tip_megatron.apps.demo_worker`
under torchrun): a tiny Llama-style model trained for a few steps at TP x PP.

Kept apart from `demo.py`, which `tip-megatron --help` imports: this module imports torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial

import torch
import torch.distributed as dist

from tip_megatron.runtime import parallel, pipeline
from tip_megatron.runtime.device import quiet_third_party_warnings
from tip_megatron.runtime.processes import die_with_torchrun, guard_rank_helpers
from tip_megatron.models import build_model
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.build import resolve_spec
from tip_megatron.models.lm import lm_batches, lm_forward_step
from tip_megatron.config import OptimConfig
from tip_megatron.train.optimizer import build_optimizer, wrap_ddp


def demo_arch() -> ModelArch:
    """The demo's model: 4 Llama layers (2 per stage at PP=2), GQA, a vocabulary that is
    not a multiple of 128 so that TP padding is exercised."""
    return ModelArch(
        family="llama", vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=8,
        num_kv_heads=4, ffn_hidden_size=96, max_position_embeddings=64, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def _steps(arch, groups, chunks, steps: int) -> list[tuple[float, float]]:
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


def run_worker(tp: int, pp: int, steps: int) -> int:
    """One rank of the demo: build, train `steps` steps, print the losses on one rank."""
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    ns = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party_warnings()
    die_with_torchrun()  # a SIGKILLed torchrun (or launcher) leaves no rank behind
    guard_rank_helpers()  # this rank's helper processes die with it
    sys.exit(run_worker(ns.tp, ns.pp, ns.steps))

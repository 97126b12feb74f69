"""Parallel parity: the same weights give the same loss and gradients under every layout.

Reference: one process, TP=1/PP=1, the whole batch as one micro-batch. Every other layout
loads the same full weights (sharded by tip_megatron.models.state), runs megatron's real
schedule with DDP (grads finalized by megatron: DP all-reduce, TP all-reduce of replicated
params such as the q/k norms, tied-embedding sync, division by the global token count),
and its gradients are gathered back to full shapes. fp32, 1e-5 relative.
"""
from functools import partial

import pytest
import torch

from tip_megatron.runtime import parallel, pipeline
from tip_megatron.models import build_model
from tip_megatron.models.lm import lm_batches, lm_forward_step
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.train.optimizer import OptimConfig, build_optimizer, wrap_ddp

NUM_SEQS, SEQ = 8, 16
# (tp, pp, vpp, dp, micro-batches per DP rank)
LAYOUTS = {
    "tp2": (2, 1, None, 1, 1),
    "tp4": (4, 1, None, 1, 1),
    "pp2_mb4": (1, 2, None, 1, 4),
    "tp2_pp2_mb4": (2, 2, None, 1, 4),
    "pp2_vpp2_mb4": (1, 2, 2, 1, 4),
    "dp2_mb2": (1, 1, None, 2, 2),
}


def _split(batches, dp_rank, dp, num_mb):
    """This DP rank's share of the global batch, cut into num_mb micro-batches."""
    full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    mine = {k: v.chunk(dp)[dp_rank] for k, v in full.items()}
    return [{k: v.chunk(num_mb)[i] for k, v in mine.items()} for i in range(num_mb)]


def _loss_and_grads(arch, layout, full):
    tp, pp, vpp, dp, num_mb = layout
    g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp, vpp=vpp))
    chunks = build_model(arch, g)
    if full is not None:
        load_full_state_dict(chunks, full, g, arch)
    weights = gather_full_state_dict(chunks, g, arch)
    ddp = wrap_ddp(chunks, g, OptimConfig(use_distributed_optimizer=False))
    mbs = _split(lm_batches(arch, 1, NUM_SEQS, SEQ, seed=3), g.dp_rank, dp, num_mb)
    reports = pipeline.forward_backward(partial(lm_forward_step, arch, g.tp_group), ddp, mbs, g,
                                        seq_length=SEQ, micro_batch_size=NUM_SEQS // dp // num_mb)
    loss = torch.stack([r["lm_loss"] for r in reports]).sum(0) if reports else None
    grads = gather_full_state_dict(ddp, g, arch, tensor_of=lambda p: p.main_grad)
    return weights, loss, grads


def _assert_close(got, ref, what):
    assert set(got) == set(ref), f"{what}: tensor names differ: {set(got) ^ set(ref)}"
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-12
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= 1e-5 * scale, f"{what}: {name} differs by {err:.3e} (scale {scale:.3e})"


def _total_loss(results):
    """Sum the (loss_sum, num_tokens) reports of the last-stage ranks of every DP replica."""
    losses = [r[1] for r in results if r[1] is not None]
    # every TP rank of a last stage reports the same value: keep one per DP replica
    unique = {}
    for loss in losses:
        unique.setdefault(tuple(loss.tolist()), loss)
    total = torch.stack(list(unique.values())).sum(0)
    return total[0] / total[1]


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", False), ("qwen3", False),
                                         ("llama", True)])
def test_layouts_agree_on_loss_and_grads(family, tied):
    arch = tiny_arch(family, tie_word_embeddings=tied)
    weights, ref_loss, ref_grads = run_distributed(_loss_and_grads, 1, args=(arch, (1, 1, None, 1, 1), None))[0]
    ref = ref_loss[0] / ref_loss[1]
    assert torch.isfinite(ref) and all(torch.isfinite(g).all() for g in ref_grads.values())
    layouts = LAYOUTS if not tied else {k: LAYOUTS[k] for k in ("pp2_mb4", "tp2_pp2_mb4")}
    for name, layout in layouts.items():
        tp, pp, vpp, dp, _ = layout
        results = run_distributed(_loss_and_grads, tp * pp * dp, args=(arch, layout, weights))
        _assert_close(results[0][0], weights, f"{family} {name} weights")
        loss = _total_loss(results)
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), f"{family} {name}: loss {loss} vs {ref}"
        for rank, r in enumerate(results):
            _assert_close(r[2], ref_grads, f"{family} {name} rank {rank} grads")


def _train(arch, layout, full, steps):
    tp, pp, vpp, dp, num_mb = layout
    g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp, vpp=vpp))
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, full, g, arch)
    cfg = OptimConfig(lr=1e-2, warmup_steps=1, clip_grad=1.0, weight_decay=0.01,
                      use_distributed_optimizer=dp > 1)
    ddp = wrap_ddp(chunks, g, cfg)
    optimizer, scheduler = build_optimizer(ddp, g, cfg, total_steps=steps)
    history = []
    for step in range(steps):
        mbs = _split(lm_batches(arch, 1, NUM_SEQS, SEQ, seed=step), g.dp_rank, dp, num_mb)
        for c in ddp:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        reports = pipeline.forward_backward(partial(lm_forward_step, arch, g.tp_group), ddp, mbs, g,
                                            seq_length=SEQ, micro_batch_size=NUM_SEQS // dp // num_mb)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss = torch.stack([r["lm_loss"] for r in reports]).sum(0) if reports else None
        history.append((loss, grad_norm))
    return history, gather_full_state_dict(ddp, g, arch)


def test_ddp_distributed_optimizer_steps_agree():
    """3 AdamW steps (warm-up + cosine, clipping, weight decay): TP2xDP2 and PP2xDP2 with the
    distributed optimizer match one process step by step, and end on the same weights."""
    arch = tiny_arch("qwen3")
    weights = run_distributed(_loss_and_grads, 1, args=(arch, (1, 1, None, 1, 1), None))[0][0]
    ref_hist, ref_final = run_distributed(_train, 1, args=(arch, (1, 1, None, 1, 1), weights, 3))[0]
    for layout in [(2, 1, None, 2, 1), (1, 2, None, 2, 2)]:
        results = run_distributed(_train, 4, args=(arch, layout, weights, 3))
        for step in range(3):
            norms = {r[0][step][1] for r in results}
            assert max(abs(n - ref_hist[step][1]) for n in norms) <= 1e-5 * ref_hist[step][1], (layout, step)
            per_rank = [(r[0][step][0]) for r in results if r[0][step][0] is not None]
            loss = _total_loss([(None, l) for l in per_rank])
            ref = ref_hist[step][0][0] / ref_hist[step][0][1]
            assert abs(loss - ref) <= 1e-5 * abs(ref), (layout, step, loss, ref)
        # Adam divides by sqrt(v): on parameters whose gradient is ~0 (embedding rows of
        # tokens absent from the batch), ulp-level grad differences become update
        # differences up to lr. Weights are therefore compared to 1% of one step's size.
        for name, ref_w in ref_final.items():
            err = (results[0][1][name] - ref_w).abs().max().item()
            assert err <= 1e-2 * 1e-2, f"final weights {layout}: {name} differs by {err:.3e}"

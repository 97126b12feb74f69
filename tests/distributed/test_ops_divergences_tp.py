"""Every `loss.divergence` of the fused output-layer loss at TP = 2 and 4 (gloo, CPU) against
the float64 reference on the unsharded weights: value, gradient w.r.t. the (replicated)
hidden state and w.r.t. each rank's output-weight shard, and the collectives per chunk.

One launch per world size runs every check. Padded layouts as in test_ops_tensor_parallel:
24 global rows; TP = 2 with a true vocab of 19, TP = 4 with 13 (rank 3 holds only padding).
"""
import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from tip_megatron.ops import fused_linear_divergence
from tip_megatron.ops.divergences import Divergence
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed

PADDED, K = 24, 10
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
#: SUM/MAX all-reduces per token chunk in the forward (docs/ops.md).
PER_CHUNK = {"reverse_kl": 2, "forward_kl": 2, "jsd": 3}


@pytest.fixture(scope="module", autouse=True)
def _megatron_imported_before_fork():
    import megatron.core.parallel_state  # noqa: F401


def _inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(K, 6, generator=g), torch.randn(PADDED, 6, generator=g),
            torch.randn(K, 5, generator=g), torch.randn(PADDED, 5, generator=g),
            torch.rand(K, generator=g))


def _counting_all_reduce(counts: Counter):
    original = dist.all_reduce

    def wrapper(*args, **kwargs):
        counts["all_reduce"] += 1
        return original(*args, **kwargs)
    return original, wrapper


def _run(inputs, rows: slice, vocab_size: int, divergence: Divergence, chunk_size: int):
    hidden, weight, th, tw, tok_w = inputs
    h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    counts = Counter()
    original, dist.all_reduce = _counting_all_reduce(counts)
    try:
        loss, value = fused_linear_divergence(
            h, w, th, tw[rows].clone(), tp_group=dist.group.WORLD, vocab_size=vocab_size,
            token_weights=tok_w, chunk_size=chunk_size, divergence=divergence)
        loss.backward()
    finally:
        dist.all_reduce = original
    return (loss.detach(), value, h.grad, w.grad), counts["all_reduce"]


def _rank_main(vocab_size: int) -> str:
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    inputs = _inputs()
    for name, beta in CASES:
        loss, value, grad_h, grad_w = ref.linear_divergence(*inputs, vocab_size, name, beta)
        want = (loss, value, grad_h, grad_w[rows])
        for chunk_size in (1, 3, K):
            got, reduces = _run(inputs, rows, vocab_size, Divergence(name, beta), chunk_size)
            for label, a, b in zip(("loss", "value", "grad_hidden", "grad_weight"), got, want):
                assert_close(a.double(), b, **ref.FP32_TOL, msg=f"{name} {beta} {label} c={chunk_size}")
            assert (got[3][max(0, vocab_size - rows.start):] == 0).all()  # padding: no gradient
            # forward: PER_CHUNK per chunk; backward: one all-reduce of the hidden gradient.
            assert reduces == PER_CHUNK[name] * math.ceil(K / chunk_size) + 1, (name, reduces)
    return "ok"


@pytest.mark.parametrize("tp, vocab_size", [(2, 19), (4, 13)], ids=["tp2", "tp4"])
def test_divergences_match_float64_reference_tp(tp, vocab_size):
    assert run_distributed(_rank_main, world_size=tp, args=(vocab_size,), timeout_s=300) == ["ok"] * tp

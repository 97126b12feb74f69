"""The top-k teacher signal at TP = 2 and 4 (gloo, CPU) against the float64 reference on the
unsharded weights (`reference_ops.linear_topk_divergence`): value, gradient w.r.t. the
replicated hidden state and each rank's weight shard, with and without the tail, for every
divergence; ties across shards (the lower id wins, whichever rank holds it); padding rows
never selected even when their logits would be the largest; the collectives per chunk; the
unreduced hidden gradient of the sequence-parallel path (`reduce_hidden_grad=False`).

Padded layouts as in test_ops_divergences_tp: 24 global rows; TP 2 with a true vocab of 19,
TP 4 with 13 (rank 3 holds only padding, rank 2 a prefix).
"""
import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from tip_megatron.ops.divergences import Divergence
from tip_megatron.ops.topk_divergence import TopkSignal, teacher_topk, topk_linear_divergence
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed

PADDED, N = 24, 7
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


@pytest.fixture(scope="module", autouse=True)
def _megatron_imported_before_fork():
    import megatron.core.parallel_state  # noqa: F401


def _inputs(vocab_size: int, tied: bool):
    g = torch.Generator().manual_seed(17)
    h, w = torch.randn(N, 6, generator=g).double(), torch.randn(PADDED, 6, generator=g).double()
    if tied:  # integer teacher logits in {-2..2}: exact ties across every shard boundary
        th = torch.zeros(N, 5, dtype=torch.float64)
        th[:, 0] = torch.arange(1, N + 1, dtype=torch.float64) % 2 + 1
        tw = torch.randint(-2, 3, (PADDED, 5), generator=g).double()
    else:
        th, tw = torch.randn(N, 5, generator=g).double() * 2, torch.randn(PADDED, 5, generator=g).double()
    tw[vocab_size:] = 50.0  # padding rows would hold the largest logits if ever read
    return h, w, th, tw, torch.rand(N, generator=g).double()


def _run(inputs, rows, vocab_size, name, beta, k, tail, chunk_size, reduce_hidden_grad=True):
    hidden, weight, th, tw, tok = inputs
    h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    counts = Counter()
    originals = dist.all_reduce, dist.all_gather

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper
    dist.all_reduce, dist.all_gather = counted(originals[0], "reduce"), counted(originals[1], "gather")
    try:
        loss, value = topk_linear_divergence(
            h, w, th, tw[rows].clone(), tp_group=dist.group.WORLD, vocab_size=vocab_size,
            signal=TopkSignal(k, tail), chunk_size=chunk_size, token_weights=tok,
            divergence=Divergence(name, beta), reduce_hidden_grad=reduce_hidden_grad)
        loss.backward()
    finally:
        dist.all_reduce, dist.all_gather = originals
    return (loss.detach(), value, h.grad, w.grad), counts


def _check_selection(inputs, rows, vocab_size, k):
    _, _, th, tw, _ = inputs
    teacher = th @ tw.t()
    width = max(0, min(rows.stop, vocab_size) - rows.start)
    _, ids = teacher_topk(teacher[:, rows][:, :width], k, rows.start, vocab_size, dist.group.WORLD)
    want = ref.topk_ids(teacher, vocab_size, k)
    assert torch.equal(ids.sort(dim=1).values, want.sort(dim=1).values), (k, ids, want)


def _rank_main(vocab_size: int) -> str:
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * PADDED // tp, (rank + 1) * PADDED // tp)
    for tied in (False, True):
        inputs = _inputs(vocab_size, tied)
        for k in (1, 4, 7, vocab_size - 1, vocab_size + 3):
            _check_selection(inputs, rows, vocab_size, k)
        for name, beta in CASES:
            for k, tail, chunk_size in ((1, True, N), (4, True, 3), (4, False, 1), (7, False, N),
                                        (vocab_size + 3, True, 3)):
                want = ref.linear_topk_divergence(*inputs, vocab_size, name, k, tail, beta)
                want = want[:3] + (want[3][rows],)
                got, counts = _run(inputs, rows, vocab_size, name, beta, k, tail, chunk_size)
                for label, a, b in zip(("loss", "value", "grad_hidden", "grad_weight"), got, want):
                    assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} k={k} tail={tail} {label}")
                assert (got[3][max(0, vocab_size - rows.start):] == 0).all()  # padding: no gradient
                chunks = math.ceil(N / chunk_size)
                tail_on = tail and k < vocab_size
                # forward per chunk: the candidates' all_gather, the student's top-k SUM, and
                # with the tail one MAX + one SUM; backward: the hidden gradient's all-reduce.
                assert counts["gather"] == chunks, counts
                assert counts["reduce"] == chunks * (3 if tail_on else 1) + 1, counts
        # Sequence parallelism: each rank returns its partial hidden gradient, unreduced
        # (gather_sequence's reduce-scatter sums them); the partials sum to the reference.
        got, counts = _run(inputs, rows, vocab_size, "reverse_kl", 0.5, 4, True, 3, reduce_hidden_grad=False)
        want = ref.linear_topk_divergence(*inputs, vocab_size, "reverse_kl", 4, True)
        assert counts["reduce"] == 3 * math.ceil(N / 3), counts
        partial = got[2].clone()
        dist.all_reduce(partial)
        assert_close(partial, want[2], rtol=1e-10, atol=1e-12)
        assert_close(got[3], want[3][rows], rtol=1e-10, atol=1e-12)
    return "ok"


@pytest.mark.parametrize("tp, vocab_size", [(2, 19), (4, 13)], ids=["tp2", "tp4"])
def test_topk_matches_float64_reference_tp(tp, vocab_size):
    assert run_distributed(_rank_main, world_size=tp, args=(vocab_size,), timeout_s=300) == ["ok"] * tp

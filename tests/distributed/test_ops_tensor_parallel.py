"""The vocab-parallel ops at TP = 2 and 4 (gloo, CPU) against the float64 reference on the
unsharded logits, and sampling at TP > 1 against the TP = 1 draws.

One process group per world size runs every check (launching ranks is the expensive part).
The padded layouts: PADDED = 24 global columns; TP = 2 uses a true vocab of 19 (not a
multiple of 2, plus extra padding), TP = 4 a true vocab of 13, so rank 3 holds only padding.
"""
import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from tip_megatron.ops import (
    fused_linear_divergence,
    unfused_linear_divergence,
    vocab_parallel_reverse_kl,
    vocab_parallel_sample,
    vocab_parallel_stats,
)
from tip_megatron.testing import reference_ops as ref
from tip_megatron.testing.distributed import run_distributed

PADDED, TOKENS = 24, 9
STAT_FIELDS = ("student_logsumexp", "student_entropy", "student_entropy_norm", "token_logprob",
               "reverse_kl", "forward_kl", "teacher_entropy")


@pytest.fixture(scope="module", autouse=True)
def _megatron_imported_before_fork():
    # The helper's per-rank teardown imports megatron.core.parallel_state; importing it once
    # here lets forked ranks inherit it instead of paying ~6 s each on exit.
    import megatron.core.parallel_state  # noqa: F401


def _full(tokens: int, width: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g) * scale


class _Ctx:
    """This rank's view: the group and how to cut a full [tokens, PADDED] tensor."""

    def __init__(self, vocab_size: int) -> None:
        self.group = dist.group.WORLD
        self.tp, self.rank = dist.get_world_size(), dist.get_rank()
        self.width = PADDED // self.tp
        self.vocab_size = vocab_size

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """Columns (or, for a [V, h] weight, rows) this rank holds; a copy, like a real shard."""
        cols = slice(self.rank * self.width, (self.rank + 1) * self.width)
        return (full[:, cols] if full.shape[-1] == PADDED else full[cols]).clone()


def _count_collectives(fn):
    counts = Counter()
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def counting(name):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        return fn(), counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _check_stats(ctx: _Ctx) -> None:
    student, teacher = _full(TOKENS, PADDED, 0), _full(TOKENS, PADDED, 1)
    ids = torch.tensor([0, 5, ctx.vocab_size - 1, ctx.vocab_size, PADDED - 1, 11, 12, 6, 1])
    run = lambda s, t: vocab_parallel_stats(  # noqa: E731
        ctx.shard(s), ctx.shard(t), tp_group=ctx.group, vocab_size=ctx.vocab_size,
        token_ids=ids, chunk_size=4)
    got, counts = _count_collectives(lambda: run(student, teacher))
    assert counts == Counter(all_reduce=2), counts  # one MAX + one batched SUM
    want = ref.stats(student, teacher, ctx.vocab_size, ids)
    for name in STAT_FIELDS:
        assert_close(getattr(got, name).double(), getattr(want, name), **ref.FP32_TOL, msg=name)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    got16, want16 = run(s16, t16), ref.stats(s16, t16, ctx.vocab_size, ids)
    for name in STAT_FIELDS:
        assert_close(getattr(got16, name).double(), getattr(want16, name),
                     **ref.BF16_SAME_VALUES_TOL, msg=name)
    same = run(student, student)
    assert same.reverse_kl.abs().max() < 1e-6 and same.forward_kl.abs().max() < 1e-6


def _extreme_full() -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = _full(4, PADDED, 5), _full(4, PADDED, 6)
    for x in (student, teacher):
        x[:, 2] = -math.inf
        x[1, 3:9] = -math.inf
    student[0, 0], teacher[0, 7], teacher[0, 0] = 1e4, 1e4, -1e4
    student[2, 8], teacher[2, 1] = 1e4, -1e4
    student[3, :12], teacher[3, :12] = torch.linspace(-1e4, 1e4, 12), torch.linspace(1e4, -1e4, 12)
    return student, teacher


def _check_extreme(ctx: _Ctx) -> None:
    student, teacher = _extreme_full()
    got = vocab_parallel_stats(ctx.shard(student), ctx.shard(teacher), tp_group=ctx.group,
                               vocab_size=ctx.vocab_size)
    want = ref.stats(student, teacher, ctx.vocab_size)
    for name in ("student_logsumexp", "student_entropy", "reverse_kl", "forward_kl", "teacher_entropy"):
        assert torch.isfinite(getattr(got, name)).all(), name
        assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-5, atol=1e-2, msg=name)
    x = ctx.shard(student).requires_grad_()
    vocab_parallel_reverse_kl(x, ctx.shard(teacher), tp_group=ctx.group,
                              vocab_size=ctx.vocab_size).sum().backward()
    assert torch.isfinite(x.grad).all()


def _check_reverse_kl_grad(ctx: _Ctx) -> None:
    upstream = torch.rand(TOKENS, generator=torch.Generator().manual_seed(3))
    for dtype, tol in ((torch.float32, ref.FP32_TOL), (torch.float64, {"rtol": 1e-10, "atol": 1e-12})):
        student, teacher = _full(TOKENS, PADDED, 7).to(dtype), _full(TOKENS, PADDED, 8).to(dtype)
        s_local, t_local = ctx.shard(student), ctx.shard(teacher)
        before = (s_local.clone(), t_local.clone())
        x = s_local.clone().requires_grad_()
        kl = vocab_parallel_reverse_kl(x, t_local, tp_group=ctx.group,
                                       vocab_size=ctx.vocab_size, chunk_size=4)
        (kl * upstream.to(dtype)).sum().backward()
        xd = student.double().clone().requires_grad_()  # .double() of fp64 is no copy
        kl_ref = ref.reverse_kl(xd, teacher, ctx.vocab_size)
        (kl_ref * upstream.double()).sum().backward()
        assert_close(kl.double(), kl_ref, **tol)
        assert_close(x.grad.double(), ctx.shard(xd.grad), **tol)
        assert torch.equal(s_local, before[0]) and torch.equal(t_local, before[1])
    x = ctx.shard(student.float()).requires_grad_()
    vocab_parallel_reverse_kl(x, x.detach().clone(), tp_group=ctx.group,
                              vocab_size=ctx.vocab_size).sum().backward()
    assert x.grad.abs().max() < 1e-6  # identical student and teacher: zero gradient


def _fused_inputs(k: int):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(k, 6, generator=g), torch.randn(PADDED, 6, generator=g),
            torch.randn(k, 5, generator=g), torch.randn(PADDED, 5, generator=g),
            torch.rand(k, generator=g))


def _run_linear(fn, ctx: _Ctx, inputs, **kwargs):
    hidden, weight, th, tw, tok_w = inputs
    h, w = hidden.clone().requires_grad_(), ctx.shard(weight).requires_grad_()
    loss, kl = fn(h, w, th, ctx.shard(tw), tp_group=ctx.group, vocab_size=ctx.vocab_size,
                  token_weights=tok_w, **kwargs)
    loss.backward()
    return loss.detach(), kl, h.grad, w.grad


def _check_fused(ctx: _Ctx) -> None:
    inputs = _fused_inputs(10)
    hd, wd, thd, twd, tok_w = (x.double() for x in inputs)
    h, w = hd.clone().requires_grad_(), wd.clone().requires_grad_()
    kl_ref = ref.reverse_kl(h @ w.t(), thd @ twd.t(), ctx.vocab_size)
    (kl_ref * tok_w).sum().backward()
    want = ((kl_ref * tok_w).sum().detach(), kl_ref.detach(), h.grad, ctx.shard(w.grad))
    unfused = _run_linear(unfused_linear_divergence, ctx, inputs)
    for chunk_size in (1, 3, 10):
        fused = _run_linear(fused_linear_divergence, ctx, inputs, chunk_size=chunk_size)
        for name, a, b, c in zip(("loss", "kl", "grad_hidden", "grad_weight"), fused, unfused, want):
            assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} chunk={chunk_size}")
            assert_close(a.double(), c, **ref.FP32_TOL, msg=f"{name} chunk={chunk_size}")
    loss, kl, grad_hidden, grad_weight = _run_linear(fused_linear_divergence, ctx, _fused_inputs(0))
    assert loss.item() == 0 and kl.numel() == 0 and grad_hidden.shape == (0, 6)
    assert (grad_weight == 0).all()


def _check_sampling(ctx: _Ctx) -> None:
    logits = _full(64, PADDED, 9, scale=2.0)
    logits[:, ctx.vocab_size:] = 100.0  # padding carries the largest values: never drawn
    logits[5, :] = logits[5, 0]  # a row of ties: lowest id wins in every layout
    configs = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.7), (1.2, 4, 0.9), (0.0, 0, 1.0)]
    for temperature, top_k, top_p in configs:
        kwargs = dict(vocab_size=ctx.vocab_size, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=77, step=5)
        ids, logprob = vocab_parallel_sample(ctx.shard(logits), tp_group=ctx.group, **kwargs)
        ids_1, logprob_1 = vocab_parallel_sample(logits, tp_group=None, **kwargs)
        assert torch.equal(ids, ids_1), (temperature, top_k, top_p)
        assert_close(logprob, logprob_1, rtol=1e-6, atol=1e-6)
        assert ids.max() < ctx.vocab_size


def _rank_main(vocab_size: int) -> str:
    dist.init_process_group("gloo")
    ctx = _Ctx(vocab_size)
    _check_stats(ctx)
    _check_extreme(ctx)
    _check_reverse_kl_grad(ctx)
    _check_fused(ctx)
    _check_sampling(ctx)
    return "ok"


@pytest.mark.parametrize("tp, vocab_size", [(2, 19), (4, 13)], ids=["tp2", "tp4"])
def test_vocab_parallel_ops_match_float64_reference(tp, vocab_size):
    assert run_distributed(_rank_main, world_size=tp, args=(vocab_size,), timeout_s=300) == ["ok"] * tp

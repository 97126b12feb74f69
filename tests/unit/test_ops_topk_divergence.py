"""The top-k teacher signal (`ops.topk_divergence`) at TP 1 against the float64 reference of
the truncated divergence (`reference_ops.topk_divergence`: a stable sort of the whole
vocabulary, then the textbook formulas on probabilities), with and without the tail; ties
in the top-k; padded vocabulary rows never selected; k >= V equals the exact divergence of
`fused_linear_divergence`. TP 2 / TP 4: tests/distributed/test_ops_topk_divergence_tp.py."""
import pytest
import torch
from torch.testing import assert_close

from tip_megatron.ops import fused_linear_divergence
from tip_megatron.ops.divergences import Divergence
from tip_megatron.ops.topk_divergence import TopkSignal, teacher_topk, topk_linear_divergence
from tip_megatron.testing import reference_ops as ref

PADDED, VOCAB, N = 24, 19, 9
NAMES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


def _inputs(dtype=torch.float64, seed=5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, 6, generator=g), torch.randn(PADDED, 6, generator=g)
    th, tw = torch.randn(N, 5, generator=g) * scale, torch.randn(PADDED, 5, generator=g)
    tw[VOCAB:] = 50.0  # padding rows: the largest teacher logits, if they were ever read
    return [x.to(dtype) for x in (h, w, th, tw)] + [torch.rand(N, generator=g).double()]


def _op(inputs, name, beta, k, tail, chunk_size=4, vocab_size=VOCAB):
    h, w, th, tw, tok = inputs
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, value = topk_linear_divergence(h, w, th, tw, tp_group=None, vocab_size=vocab_size,
                                         signal=TopkSignal(k, tail), chunk_size=chunk_size,
                                         token_weights=tok.to(h.dtype), divergence=Divergence(name, beta))
    loss.backward()
    return loss.detach(), value, h.grad, w.grad


@pytest.mark.parametrize("name,beta", NAMES)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
@pytest.mark.parametrize("k", [1, 3, 8, VOCAB - 1])
@pytest.mark.parametrize("chunk_size", [4, N])
def test_topk_matches_float64_reference(name, beta, tail, k, chunk_size):
    inputs = _inputs()
    want = ref.linear_topk_divergence(*inputs, VOCAB, name, k, tail, beta)
    got = _op(inputs, name, beta, k, tail, chunk_size)
    for label, a, b in zip(("loss", "value", "grad_hidden", "grad_weight"), got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{label}")
    assert (got[3][VOCAB:] == 0).all()  # padding rows: no gradient


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
def test_fp32_inputs_within_fp32_tolerance(tail):
    inputs = _inputs(torch.float32, seed=8)
    want = ref.linear_topk_divergence(*inputs, VOCAB, "reverse_kl", 5, tail)
    for a, b in zip(_op(inputs, "reverse_kl", 0.5, 5, tail), want):
        assert_close(a.double(), b, **ref.FP32_TOL)


def test_truncation_changes_the_value():
    """The reference is not the full divergence in disguise: top-3 differs from the exact KL."""
    inputs = _inputs()
    exact = ref.linear_divergence(*inputs, VOCAB, "reverse_kl")[1]
    for tail in (True, False):
        assert (_op(inputs, "reverse_kl", 0.5, 3, tail)[1] - exact).abs().max() > 1e-3


@pytest.mark.parametrize("k", [VOCAB, VOCAB + 5, 10 ** 6])
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no-tail"])
@pytest.mark.parametrize("name,beta", NAMES)
def test_k_at_least_vocab_is_the_full_divergence(k, tail, name, beta):
    inputs = _inputs()
    h, w, th, tw, tok = inputs
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, value = fused_linear_divergence(hf, wf, th, tw, tp_group=None, vocab_size=VOCAB,
                                          token_weights=tok, divergence=Divergence(name, beta))
    loss.backward()
    got = _op(inputs, name, beta, k, tail)
    for a, b in zip(got, (loss.detach(), value, hf.grad, wf.grad)):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def _tied_inputs():
    """Integer teacher logits in {-2..2}: many exact ties at every top-k boundary."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(N, 6, generator=g).double(), torch.randn(PADDED, 6, generator=g).double()
    th = torch.zeros(N, 5, dtype=torch.float64)
    th[:, 0] = 1.0
    tw = torch.randint(-2, 3, (PADDED, 5), generator=g).double()
    tw[VOCAB:] = 9.0
    return [h, w, th, tw, torch.rand(N, generator=g).double()]


@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_ties_take_the_lower_id(k):
    inputs = _tied_inputs()
    teacher = inputs[2] @ inputs[3].t()
    _, ids = teacher_topk(teacher[:, :VOCAB], k, 0, VOCAB, None)
    want = ref.topk_ids(teacher, VOCAB, k)
    assert torch.equal(ids.sort(dim=1).values, want.sort(dim=1).values)
    assert (ids < VOCAB).all()
    for tail in (True, False):
        got = _op(inputs, "reverse_kl", 0.5, k, tail)
        want_all = ref.linear_topk_divergence(*inputs, VOCAB, "reverse_kl", k, tail)
        for a, b in zip(got, want_all):
            assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_signal_is_one_line():
    with pytest.raises(ValueError, match=r"teacher.topk=0: must be an integer >= 1"):
        TopkSignal(0)
    with pytest.raises(ValueError, match=r"teacher.topk_tail='yes': must be true or false"):
        TopkSignal(4, "yes")


@pytest.mark.parametrize("name,beta", NAMES)
def test_tail_is_a_lower_bound_renormalising_is_not(name, beta):
    """Merging the tokens outside K into one class loses information: with the tail D_k <= D
    (data-processing inequality) and D_k grows with k, for every divergence; renormalising
    over K over- and under-states D (docs/ops.md: why the tail is the default)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(200, 8, generator=g).double(), torch.randn(50, 8, generator=g).double()
    th, tw = torch.randn(200, 8, generator=g).double(), torch.randn(50, 8, generator=g).double()
    inputs = [h, w, th, tw, torch.ones(200, dtype=torch.float64)]
    exact = ref.linear_divergence(*inputs, 50, name, beta)[1]
    previous = torch.zeros_like(exact)
    for k in (2, 5, 20, 49):  # each larger K refines the partition: D_k grows towards D
        tail = _op(inputs, name, beta, k, True, vocab_size=50)[1]
        assert (previous <= tail + 1e-12).all() and (tail <= exact + 1e-12).all()
        previous = tail
    below = torch.cat([_op(inputs, name, beta, k, False, vocab_size=50)[1] - exact for k in (2, 5, 20)])
    assert below.max() > 0 > below.min()

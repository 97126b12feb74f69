"""fused_linear_divergence == unfused_linear_divergence == float64 reference, at TP = 1.

TP = 2 (with the hidden-gradient all-reduce) is in tests/distributed/test_ops_tensor_parallel.py.
"""
import pytest
import torch
from torch.testing import assert_close

from tip_megatron.ops import fused_linear_divergence, unfused_linear_divergence, vocab_parallel_stats
from tip_megatron.ops.divergences import Divergence
from tip_megatron.testing import reference_ops as ref

K, H, H_T, WIDTH, VOCAB = 10, 6, 5, 24, 21


def _inputs(dtype=torch.float32, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, H, generator=g).to(dtype)
    weight = torch.randn(WIDTH, H, generator=g).to(dtype)
    teacher_hidden = torch.randn(k, H_T, generator=g).to(dtype)
    teacher_weight = torch.randn(WIDTH, H_T, generator=g).to(dtype)
    token_weights = torch.rand(k, generator=g)
    return hidden, weight, teacher_hidden, teacher_weight, token_weights


def _run(fn, inputs, **kwargs):
    hidden, weight, th, tw, tok_w = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, kl = fn(h, w, th, tw, tp_group=None, vocab_size=VOCAB, token_weights=tok_w, **kwargs)
    loss.backward()
    return loss.detach(), kl, h.grad, w.grad


def _reference(inputs):
    hidden, weight, th, tw, tok_w = (x.double() for x in inputs)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kl = ref.reverse_kl(h @ w.t(), th @ tw.t(), VOCAB)
    loss = (kl * tok_w).sum()
    loss.backward()
    return loss.detach(), kl.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 3, 4, K, 64])
def test_fused_equals_unfused_and_reference(chunk_size):
    inputs = _inputs()
    fused = _run(fused_linear_divergence, inputs, chunk_size=chunk_size)
    unfused = _run(unfused_linear_divergence, inputs)
    want = _reference(inputs)
    for name, a, b, c in zip(("loss", "kl", "grad_hidden", "grad_weight"), fused, unfused, want):
        assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        assert_close(a.double(), c, **ref.FP32_TOL, msg=name)
    assert (fused[3][VOCAB:] == 0).all()  # padded rows of the weight get no gradient


def test_fused_bf16_close_to_unfused():
    inputs = _inputs(torch.bfloat16)
    fused = _run(fused_linear_divergence, inputs, chunk_size=3)
    unfused = _run(unfused_linear_divergence, inputs)
    for name, a, b in zip(("loss", "kl", "grad_hidden", "grad_weight"), fused, unfused):
        assert a.dtype == b.dtype, name
        assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_fused_with_zero_tokens():
    inputs = _inputs(k=0)
    loss, kl, grad_hidden, grad_weight = _run(fused_linear_divergence, inputs, chunk_size=4)
    assert loss.item() == 0.0 and kl.shape == (0,)
    assert grad_hidden.shape == (0, H) and (grad_weight == 0).all()


def test_fused_upstream_scale_and_no_grad_path():
    inputs = _inputs()
    hidden, weight, th, tw, _ = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_divergence(h, w, th, tw, tp_group=None, vocab_size=VOCAB, chunk_size=4)
    (3.0 * loss).backward()
    _, _, grad_hidden, grad_weight = _run(fused_linear_divergence, inputs[:4] + (torch.ones(K),))
    assert_close(h.grad, 3.0 * grad_hidden)
    assert_close(w.grad, 3.0 * grad_weight)
    with torch.no_grad():
        loss, kl = fused_linear_divergence(h, w, th, tw, tp_group=None, vocab_size=VOCAB)
    assert not loss.requires_grad and not kl.requires_grad
    assert_close(loss, kl.sum())


def test_fused_input_errors():
    hidden, weight, th, tw, _ = _inputs()
    with pytest.raises(ValueError, match="student shard width 24 != teacher shard width 23"):
        fused_linear_divergence(hidden, weight, th, tw[:23], tp_group=None, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="token_weights must be"):
        fused_linear_divergence(hidden, weight, th, tw, tp_group=None, vocab_size=VOCAB,
                                token_weights=torch.ones(3))
    forward_kl = Divergence("forward_kl")
    with pytest.raises(ValueError, match="divergence='forward_kl'; accepted: 'reverse_kl'"):
        unfused_linear_divergence(hidden, weight, th, tw, tp_group=None, vocab_size=VOCAB,
                                  divergence=forward_kl)


def test_fused_computes_only_the_gradients_asked_for():
    inputs = _inputs()
    hidden, weight, th, tw, tok_w = inputs
    want = _reference(inputs)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_divergence(h, weight, th, tw, tp_group=None, vocab_size=VOCAB,
                                      token_weights=tok_w)
    loss.backward()
    assert weight.grad is None
    assert_close(h.grad.double(), want[2], **ref.FP32_TOL)
    w = weight.clone().requires_grad_()
    loss, _ = fused_linear_divergence(hidden, w, th, tw, tp_group=None, vocab_size=VOCAB,
                                      token_weights=tok_w)
    loss.backward()
    assert_close(w.grad.double(), want[3], **ref.FP32_TOL)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_observer_sees_every_chunk_and_its_statistics_match_the_reference(divergence):
    """`observe` gets each chunk's true-vocab logits once, in order, before the divergence;
    statistics taken there in the loss's own workspace (shard_width: the padded width)
    equal the float64 reference, and the loss and gradients are those without observer."""
    inputs = _inputs(k=13)
    hidden, weight, th, tw, _ = inputs
    seen, stats = [], []

    def observe(rows, student, teacher, work):
        seen.append((rows, student.clone(), teacher.clone()))
        stats.append(vocab_parallel_stats(student, teacher, tp_group=None, vocab_size=VOCAB,
                                          shard_width=WIDTH, work=work,
                                          chunk_size=work.buffers[0].shape[0]))

    div = Divergence(divergence, 0.3)
    plain = _run(fused_linear_divergence, inputs, chunk_size=4, divergence=div)
    got = _run(fused_linear_divergence, inputs, chunk_size=4, divergence=div, observe=observe)
    for a, b in zip(plain, got):
        assert torch.equal(a, b)
    assert [rows for rows, _, _ in seen] == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 13)]
    student = torch.cat([s for _, s, _ in seen])
    teacher = torch.cat([t for _, _, t in seen])
    assert_close(student, hidden @ weight[:VOCAB].t())
    assert_close(teacher, th @ tw[:VOCAB].t())
    logp = torch.log_softmax((hidden @ weight[:VOCAB].t()).double(), -1)
    logq = torch.log_softmax((th @ tw[:VOCAB].t()).double(), -1)
    want = {"reverse_kl": (logp.exp() * (logp - logq)).sum(-1),
            "forward_kl": (logq.exp() * (logq - logp)).sum(-1),
            "student_entropy": -(logp.exp() * logp).sum(-1),
            "teacher_entropy": -(logq.exp() * logq).sum(-1)}
    for name, value in want.items():
        assert_close(torch.cat([getattr(s, name) for s in stats]).double(), value, rtol=1e-5, atol=1e-6)


def test_stats_shard_width_refuses_fewer_columns_than_the_true_vocab():
    logits = torch.randn(3, VOCAB - 1)
    with pytest.raises(ValueError, match="fewer than the shard's 21 true-vocab columns"):
        vocab_parallel_stats(logits, logits, tp_group=None, vocab_size=VOCAB, shard_width=WIDTH)

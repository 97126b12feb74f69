"""vocab_parallel_stats / vocab_parallel_reverse_kl at TP = 1 (tp_group=None) vs float64.

The same checks at TP = 2 and 4 live in tests/distributed/test_ops_tensor_parallel.py.
"""
import math

import pytest
import torch
from torch.testing import assert_close

from tip_megatron.ops import (
    check_vocab_compat,
    vocab_parallel_reverse_kl,
    vocab_parallel_stats,
)
from tip_megatron.testing import reference_ops as ref

STAT_FIELDS = ("student_logsumexp", "student_entropy", "student_entropy_norm", "token_logprob",
               "reverse_kl", "forward_kl", "teacher_entropy")


def _logits(tokens: int, width: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g) * scale


def _assert_stats(got, want, tol) -> None:
    for name in STAT_FIELDS:
        assert_close(getattr(got, name).double(), getattr(want, name), **tol, msg=name)


@pytest.mark.parametrize("vocab_size, width", [(40, 40), (37, 48)], ids=["exact", "padded"])
def test_stats_match_float64_reference(vocab_size, width):
    student, teacher = _logits(9, width, 0), _logits(9, width, 1)
    ids = torch.tensor([0, 5, vocab_size - 1, 3, vocab_size, width - 1, 7, 2, 1])
    got = vocab_parallel_stats(student, teacher, tp_group=None, vocab_size=vocab_size,
                               token_ids=ids, chunk_size=4)
    _assert_stats(got, ref.stats(student, teacher, vocab_size, ids), ref.FP32_TOL)
    out_of_vocab = ids >= vocab_size
    assert torch.isneginf(got.token_logprob[out_of_vocab]).all()
    assert torch.isfinite(got.token_logprob[~out_of_vocab]).all()
    assert got.student_entropy.dtype == torch.float32


def test_stats_without_teacher_or_ids():
    student = _logits(5, 16, 2)
    got = vocab_parallel_stats(student, tp_group=None, vocab_size=16)
    assert got.reverse_kl is None and got.token_logprob is None and got.teacher_entropy is None
    want = ref.stats(student, None, 16)
    assert_close(got.student_entropy.double(), want.student_entropy, **ref.FP32_TOL)
    assert ((got.student_entropy_norm >= 0) & (got.student_entropy_norm <= 1)).all()


def test_stats_bf16_within_documented_tolerance():
    student, teacher = _logits(8, 32, 3), _logits(8, 32, 4)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    got = vocab_parallel_stats(s16, t16, tp_group=None, vocab_size=30)
    same = ref.stats(s16, t16, 30)
    rounded = ref.stats(student, teacher, 30)
    for name in ("student_logsumexp", "student_entropy", "reverse_kl", "forward_kl", "teacher_entropy"):
        value = getattr(got, name).double()
        assert_close(value, getattr(same, name), **ref.BF16_SAME_VALUES_TOL, msg=name)
        assert_close(value, getattr(rounded, name), **ref.BF16_ROUNDED_TOL, msg=name)


def _extreme_pair() -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = _logits(4, 12, 5), _logits(4, 12, 6)
    for x in (student, teacher):
        x[:, 3] = -math.inf  # masked in both models
        x[1, :6] = -math.inf
    student[0, 0], teacher[0, 1], teacher[0, 0] = 1e4, 1e4, -1e4
    student[2, 2], student[2, 4], teacher[2, 5] = -1e4, 1e4, -1e4
    student[3], teacher[3] = torch.linspace(-1e4, 1e4, 12), torch.linspace(1e4, -1e4, 12)
    student[3, 3] = teacher[3, 3] = -math.inf
    return student, teacher


def test_extreme_logits_give_finite_outputs_and_grads():
    student, teacher = _extreme_pair()
    before = (student.clone(), teacher.clone())
    got = vocab_parallel_stats(student, teacher, tp_group=None, vocab_size=11,
                               token_ids=torch.tensor([0, 7, 4, 11]))
    for name in STAT_FIELDS[:-1] + ("teacher_entropy",):
        value = getattr(got, name)
        finite = value[:3] if name == "token_logprob" else value  # id 11 is padding: -inf
        assert torch.isfinite(finite).all(), (name, value)
    _assert_stats_finite_match(got, ref.stats(student, teacher, 11, torch.tensor([0, 7, 4, 11])))
    x = student.clone().requires_grad_()
    vocab_parallel_reverse_kl(x, teacher, tp_group=None, vocab_size=11).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 3] == 0).all() and (x.grad[:, 11] == 0).all()
    assert torch.equal(student, before[0]) and torch.equal(teacher, before[1])


def _assert_stats_finite_match(got, want) -> None:
    # 1e4-scale logits: the KL itself is ~2e4, so compare relative to that scale.
    for name in STAT_FIELDS:
        assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-5, atol=1e-2, msg=name)


def test_identical_student_teacher_gives_zero_kl_and_zero_grad():
    student = _logits(6, 20, 7, scale=30.0).bfloat16()
    got = vocab_parallel_stats(student, student.clone(), tp_group=None, vocab_size=19)
    assert (got.reverse_kl.abs() < 1e-6).all() and (got.forward_kl.abs() < 1e-6).all()
    assert_close(got.teacher_entropy, got.student_entropy)
    x = student.float().requires_grad_()
    kl = vocab_parallel_reverse_kl(x, x.detach().clone(), tp_group=None, vocab_size=19)
    kl.sum().backward()
    assert kl.abs().max() < 1e-6 and x.grad.abs().max() < 1e-6


def test_reverse_kl_gradcheck_float64():
    student = _logits(3, 7, 8).double().requires_grad_()
    teacher = _logits(3, 7, 9).double()

    def fn(s: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_reverse_kl(s, teacher, tp_group=None, vocab_size=6, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_kl_value_and_grad_match_reference(dtype):
    student, teacher = _logits(7, 24, 10).to(dtype), _logits(7, 24, 11).to(dtype)
    upstream = torch.rand(7, generator=torch.Generator().manual_seed(0))
    x = student.clone().requires_grad_()
    kl = vocab_parallel_reverse_kl(x, teacher, tp_group=None, vocab_size=21, chunk_size=3)
    (kl * upstream).sum().backward()
    xd = student.double().requires_grad_()
    kl_ref = ref.reverse_kl(xd, teacher, 21)
    (kl_ref * upstream.double()).sum().backward()
    tol = ref.FP32_TOL if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    assert_close(kl.double(), kl_ref, **ref.FP32_TOL)
    assert_close(x.grad.double(), xd.grad, **tol)
    assert x.grad.dtype == dtype and (x.grad[:, 21:] == 0).all()


def test_reverse_kl_leaves_inputs_alone_and_guards_saved_tensors():
    student, teacher = _logits(4, 10, 12), _logits(4, 10, 13)
    x = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    vocab_parallel_reverse_kl(x, t, tp_group=None, vocab_size=10).sum().backward()
    assert torch.equal(x.detach(), student) and torch.equal(t.detach(), teacher)
    assert t.grad is None  # the teacher is frozen
    # In-place edits after the forward bump the version counter of a saved input.
    y = student.clone().requires_grad_()
    logits = y * 1.0
    kl = vocab_parallel_reverse_kl(logits, teacher, tp_group=None, vocab_size=10)
    version = logits._version
    logits.add_(1.0)
    assert logits._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kl.sum().backward()


def test_shape_and_vocab_errors_are_actionable():
    s = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="student shard width 8 != teacher shard width 9"):
        vocab_parallel_stats(s, torch.zeros(2, 9), tp_group=None, vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=9 exceeds"):
        vocab_parallel_reverse_kl(s, s, tp_group=None, vocab_size=9)
    with pytest.raises(ValueError, match=r"\[tokens, V/tp\]"):
        vocab_parallel_stats(torch.zeros(2, 2, 8), tp_group=None, vocab_size=8)


def test_check_vocab_compat():
    assert check_vocab_compat(151936, 151936) == 151936
    assert check_vocab_compat(151936, 152064, shared_vocab=151665) == 151665
    with pytest.raises(ValueError, match="set shared_vocab_size=N"):
        check_vocab_compat(151936, 152064)
    with pytest.raises(ValueError, match="shared_vocab_size=152000"):
        check_vocab_compat(151936, 152064, shared_vocab=152000)

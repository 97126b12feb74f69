"""The loss path's scoring at its own chunk size (`loss.score_chunk_size`).

`build_signals` scores the response positions in chunks of `score_chunk_size` tokens;
every chunking (1 token, a size that does not divide the count, one chunk) gives the
float64 reference's entropy and KLs at those positions, and zero elsewhere.
"""
import math

import pytest
import torch

from tip_megatron.distill.loss import build_signals
from tip_megatron.distill.spec import DistillSpec, LossConfig, MicrobatchContext
from tip_megatron.testing import reference_ops as ref
from tip_megatron.tip import SelectionConfig

VOCAB, PADDED, B, S, H, HT = 50, 64, 3, 7, 16, 24


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, H, generator=gen)
    weight = torch.randn(PADDED, H, generator=gen)
    teacher_hidden = torch.randn(S, B, HT, generator=gen)
    teacher_weight = torch.randn(PADDED, HT, generator=gen) * 0.7
    target = torch.rand(B, S, generator=gen) > 0.4
    ctx = MicrobatchContext(teacher_hidden, teacher_weight, target, torch.arange(B))
    return hidden, weight, ctx


@pytest.mark.parametrize("score_chunk", [1, 4, 1000])
def test_scoring_chunks_equal_the_float64_reference(score_chunk):
    hidden, weight, ctx = _inputs()
    spec = DistillSpec(SelectionConfig(), LossConfig(score_chunk_size=score_chunk), VOCAB, None)
    flat = hidden.transpose(0, 1).reshape(-1, H)
    signals, finite = build_signals(flat, weight, ctx, spec)
    assert finite
    teacher_flat = ctx.teacher_hidden.transpose(0, 1).reshape(-1, HT)
    want = ref.stats((flat @ weight.t()).double(), (teacher_flat @ ctx.teacher_weight.t()).double(), VOCAB)
    target = ctx.target_mask.reshape(-1)
    assert 0 < int(target.sum()) < target.numel()
    for got, exp in ((signals.entropy_norm, want.student_entropy / math.log(VOCAB)),
                     (signals.reverse_kl, want.reverse_kl), (signals.forward_kl, want.forward_kl)):
        torch.testing.assert_close(got[target].double(), exp[target], **ref.FP32_TOL)
        assert not got[~target].any()


@pytest.mark.parametrize("key,value", [("score_chunk_size", 0), ("chunk_size", -1),
                                       ("score_chunk_size", 2.5)])
def test_bad_chunk_sizes_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"loss.{key}={value!r}: must be an integer >= 1"):
        LossConfig(**{key: value})

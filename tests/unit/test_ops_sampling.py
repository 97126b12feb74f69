"""vocab_parallel_sample at TP = 1: goodness of fit, truncation, determinism, log-probs.

TP = 2 and 4 draws equal to these TP = 1 draws: tests/distributed/test_ops_tensor_parallel.py.
"""
import math

import pytest
import torch
from torch.testing import assert_close

from tip_megatron.testing import reference_ops as ref
from tip_megatron.ops import vocab_parallel_sample
from tip_megatron.ops.sampling import (TOP_P_CANDIDATES, _call_key, _fmix32, _mix_word, hash_u32,
                                       vocab_parallel_logprob)

VOCAB, WIDTH, DRAWS = 12, 16, 20000


def _row_logits() -> torch.Tensor:
    """One row of logits (plus 4 padded columns holding the largest values) repeated."""
    row = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.5, 0.2, 0.0, -0.3, -1.0, -1.5, -2.0, -3.0,
                        50.0, 50.0, 50.0, 50.0])
    return row.expand(DRAWS, WIDTH)


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    expected = probs * counts.sum()
    keep = expected >= 5  # chi-square needs >= 5 expected per bin: merge the rest
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)]).double()
    expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if expected[-1] < 5:
        observed, expected = observed[:-1], expected[:-1]
        expected = expected * observed.sum() / expected.sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.85)],
    ids=["plain", "temperature", "top_k", "top_p", "top_k_top_p"],
)
def test_frequencies_match_truncated_softmax(temperature, top_k, top_p):
    logits = _row_logits()
    ids, logprob = vocab_parallel_sample(logits, tp_group=None, vocab_size=VOCAB, seed=1234,
                                         temperature=temperature, top_k=top_k, top_p=top_p)
    probs = ref.sampling_probs(logits[:1], VOCAB, temperature, top_k, top_p)[0]
    assert ids.max() < VOCAB  # the padded columns hold the largest logits: never drawn
    counts = torch.bincount(ids, minlength=VOCAB)
    assert (counts[probs == 0] == 0).all()  # truncated tokens are never drawn
    assert _chi_square_pvalue(counts, probs) > 1e-3
    assert_close(logprob.double(), probs.log()[ids], rtol=1e-6, atol=1e-6)


def test_greedy_and_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -math.inf, 5.0, 9.0]])
    ids, logprob = vocab_parallel_sample(logits, tp_group=None, vocab_size=3, temperature=0.0, seed=0)
    assert ids.tolist() == [1, 0]  # lowest id among equal maxima; column 3 is padding
    assert (logprob == 0).all()


def test_draws_are_a_pure_function_of_seed_and_step():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    def draw(**kw):
        return vocab_parallel_sample(logits, tp_group=None, vocab_size=10, **kw)[0]

    assert torch.equal(draw(seed=5, step=3), draw(seed=5, step=3))
    assert torch.equal(draw(seed=5, step=3, chunk_size=7), draw(seed=5, step=3))
    assert not torch.equal(draw(seed=5, step=3), draw(seed=5, step=4))
    assert not torch.equal(draw(seed=5, step=3), draw(seed=6, step=3))
    # row_offset keys the noise by global row: a slice of the rows draws what it drew
    # inside the full batch (data-parallel replicas each holding a slice).
    part = vocab_parallel_sample(logits[40:], tp_group=None, vocab_size=10, seed=5, step=3,
                                 row_offset=40)[0]
    assert torch.equal(part, draw(seed=5, step=3)[40:])


def test_draws_are_keyed_by_row_identity_and_counter():
    """A row draws the same token whatever slot of the batch it sits in (an engine that
    compacts or reorders its batch passes row ids); the counter gives fresh draws."""
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(1000, 1050)
    counters = torch.arange(50) % 7
    base = vocab_parallel_sample(logits, tp_group=None, vocab_size=300, seed=3, step=2,
                                 row_ids=ids, counters=counters)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(2))
    moved = vocab_parallel_sample(logits[perm], tp_group=None, vocab_size=300, seed=3, step=2,
                                  row_ids=ids[perm], counters=counters[perm])
    assert torch.equal(moved[0], base[0][perm]) and torch.equal(moved[1], base[1][perm])
    fresh = vocab_parallel_sample(logits, tp_group=None, vocab_size=300, seed=3, step=2,
                                  row_ids=ids, counters=counters + 1)[0]
    assert (fresh != base[0]).float().mean() > 0.5
    with pytest.raises(ValueError, match="row_ids"):
        vocab_parallel_sample(logits, tp_group=None, vocab_size=300, seed=3, row_ids=ids[:3])


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.7), (10, 0.8), (25, 1.0)])
def test_logprob_of_given_ids_equals_the_samplers(top_k, top_p):
    logits = 3 * torch.randn(40, 200, generator=torch.Generator().manual_seed(4))
    ids, logprob = vocab_parallel_sample(logits, tp_group=None, vocab_size=190, seed=9,
                                         temperature=0.8, top_k=top_k, top_p=top_p)
    again = vocab_parallel_logprob(logits, ids, tp_group=None, vocab_size=190, temperature=0.8,
                                   top_k=top_k, top_p=top_p)
    want = ref.sampling_probs(logits, 190, 0.8, top_k, top_p).gather(1, ids[:, None]).squeeze(1).log()
    assert_close(again, want, rtol=0, atol=1e-10)
    assert_close(logprob.double(), want, rtol=0, atol=1e-6)


def test_top_k_ties_then_top_p_keep_what_hf_keeps():
    """Ties at the k-th value stay in the top-k set that top-p renormalises over (HF's
    TopKLogitsWarper + TopPLogitsWarper on the same logits): 3, 2.5, 2, 1.5 and three ties
    at 1.0; top_k 5 keeps all seven, top_p 0.8 then needs id 40 (0.758 before it, over the
    seven). Computing top-p over only the first 5 sorted values kept [10, 20, 30]."""
    transformers = pytest.importorskip("transformers")
    logits = torch.full((1, 100), -30.0, dtype=torch.float64)
    for token, value in zip((10, 20, 30, 40, 50, 60, 70), (3.0, 2.5, 2.0, 1.5, 1.0, 1.0, 1.0)):
        logits[0, token] = value
    hf = transformers.TopPLogitsWarper(0.8)(None, transformers.TopKLogitsWarper(5)(None, logits.clone()))
    everything = torch.arange(100)
    ours = vocab_parallel_logprob(logits.expand(100, 100), everything, tp_group=None,
                                  vocab_size=100, top_k=5, top_p=0.8)
    assert everything[ours > -math.inf].tolist() == everything[hf[0] > -math.inf].tolist() == [10, 20, 30, 40]
    assert_close(ours[[10, 20, 30, 40]], hf.log_softmax(dim=-1)[0, [10, 20, 30, 40]], rtol=0, atol=1e-12)


def test_top_p_on_a_flat_distribution_falls_back_to_bisection():
    """Mass spread over far more than TOP_P_CANDIDATES ids: the candidates cannot cover
    top_p, the bisection decides; the draws still follow the truncated softmax."""
    width = 4 * TOP_P_CANDIDATES
    row = torch.linspace(0.0, 1.0, width)
    logits = row.expand(DRAWS, width)
    ids, logprob = vocab_parallel_sample(logits, tp_group=None, vocab_size=width, seed=5, top_p=0.6)
    probs = ref.sampling_probs(logits[:1], width, 1.0, 0, 0.6)[0]
    counts = torch.bincount(ids, minlength=width)
    assert (counts[probs == 0] == 0).all() and (probs > 0).sum() > TOP_P_CANDIDATES
    assert _chi_square_pvalue(counts, probs) > 1e-3
    assert_close(logprob.double(), probs.log()[ids], rtol=1e-6, atol=1e-6)


def test_hash_tensor_path_equals_python_reference():
    rows = torch.tensor([[0], [7], [2**31 + 1]])
    cols = torch.tensor([[0, 1, 151935, 2**32 - 1]])
    got = hash_u32(2**40 + 3, -5, 1, rows, cols)
    for i, r in enumerate(rows[:, 0].tolist()):
        for j, c in enumerate(cols[0].tolist()):
            want = _fmix32(_mix_word(_mix_word(_call_key(2**40 + 3, -5, 1), r), c) ^ 16)
            assert got[i, j].item() == want
    assert got.min() >= 0 and got.max() < 2**32


def test_sampling_argument_errors():
    logits = torch.zeros(2, 4)
    for kwargs, match in [({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
                          ({"top_p": 0.0}, "top_p"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(ValueError, match=match):
            vocab_parallel_sample(logits, tp_group=None, vocab_size=4, **{"seed": 0, **kwargs})


def test_reused_buffers_draw_what_fresh_ones_and_a_plain_inverse_cdf_draw():
    """A decoding loop passes one `SamplingBuffers` every step (rows shrink and grow, the
    temperature, truncation and padded width change): every draw equals a fresh call's,
    bit for bit, and a plain float64 inverse-CDF draw over the whole row."""
    from tip_megatron.ops.sampling import SamplingBuffers, uniform_rows

    gen = torch.Generator().manual_seed(0)
    buffers = SamplingBuffers()
    calls = [(9, 1000, 1.0, 0, 1.0, None), (3, 1000, 0.7, 0, 1.0, None), (17, 997, 1.0, 0, 1.0, 4),
             (5, 1000, 1.0, 20, 0.9, None), (12, 1000, 1.3, 0, 1.0, 5)]
    for rows, vocab, temperature, top_k, top_p, chunk in calls:
        logits = torch.randn(rows, 1024, generator=gen) * 3
        kw = dict(tp_group=None, vocab_size=vocab, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=7, step=rows, row_ids=torch.arange(rows) * 3, counters=torch.arange(rows) % 4,
                  chunk_size=chunk)
        fresh = vocab_parallel_sample(logits, **kw)
        reused = vocab_parallel_sample(logits, **kw, buffers=buffers)
        assert torch.equal(fresh[0], reused[0]) and torch.equal(fresh[1], reused[1])
        if top_k or top_p < 1:
            continue
        z = logits[:, :vocab].double() / temperature
        p = (z - z.amax(1, keepdim=True)).exp()
        u = uniform_rows(7, rows, kw["row_ids"], kw["counters"])
        want = ((p.cumsum(1) <= (u * p.sum(1))[:, None]).sum(1))
        assert torch.equal(fresh[0], want)
        assert_close(fresh[1].double(), torch.log_softmax(z, 1).gather(1, want[:, None]).squeeze(1),
                     rtol=0, atol=1e-6)


def test_cpu_draw_chunks_rows_by_its_own_float64_budget():
    """The draw's rows per chunk on CPU follow SAMPLE_CHUNK_ELEMENTS_CPU (not the loss's
    fp32 budget); an explicit chunk_size wins; and the chunking changes no bit of the
    draw (ids and log-probs at 1, 16 and every row per chunk)."""
    from tip_megatron.ops.sampling import SAMPLE_CHUNK_ELEMENTS_CPU, _sample_chunk

    cpu = torch.device("cpu")
    assert _sample_chunk(32000, None, cpu) == SAMPLE_CHUNK_ELEMENTS_CPU // 32000 == 131
    assert _sample_chunk(151936, None, cpu) == 27
    assert _sample_chunk(151936, 5, cpu) == 5
    assert _sample_chunk(10**8, None, cpu) == 1
    assert _sample_chunk(151936, None, cpu, rows=128) == 128  # untruncated: all rows at once
    assert _sample_chunk(151936, 5, cpu, rows=128) == 5
    logits = torch.randn(40, 3000, generator=torch.Generator().manual_seed(2)) * 3
    draws = [vocab_parallel_sample(logits, tp_group=None, vocab_size=2990, seed=1, step=2,
                                   temperature=0.7, chunk_size=c) for c in (1, 16, None)]
    for ids, logprob in draws[1:]:
        assert torch.equal(ids, draws[0][0]) and torch.equal(logprob, draws[0][1])


@pytest.mark.parametrize("vocab,temperature", [(1024, 1.0), (1024, 0.7), (1000, 1.3)])
def test_untruncated_exp_pass_size_changes_no_bit(monkeypatch, vocab, temperature):
    """The untruncated draw computes exp(z - max) a few rows at a time on CPU and the
    chosen block's masses again from its logits: at every pass size (1 row, 5 rows, all
    rows; widths of 1024 = 8 blocks and 1000 = 125 blocks of 8) the ids and log-probs are
    the same bits, the ids are a plain float64 inverse-CDF draw's over the whole row, and
    the log-probs are float64 log_softmax's."""
    from tip_megatron.ops import sampling

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(37, vocab, generator=gen) * 4
    kw = dict(tp_group=None, vocab_size=vocab, temperature=temperature, seed=11, step=3,
              row_ids=torch.arange(37) * 5, counters=torch.arange(37) % 3)
    draws = []
    for rows in (1, 5, 37):
        monkeypatch.setattr(sampling, "MASS_PASS_ELEMENTS_CPU", rows * vocab)
        assert sampling._mass_pass_rows(37, vocab, torch.device("cpu")) == rows
        draws.append(vocab_parallel_sample(logits, **kw, buffers=sampling.SamplingBuffers()))
    for ids, logprob in draws[1:]:
        assert torch.equal(ids, draws[0][0]) and torch.equal(logprob, draws[0][1])
    z = logits.double() / temperature
    p = (z - z.amax(1, keepdim=True)).exp()
    u = sampling.uniform_rows(11, 3, kw["row_ids"], kw["counters"])
    want = (p.cumsum(1) <= (u * p.sum(1))[:, None]).sum(1)
    assert torch.equal(draws[0][0], want)
    assert_close(draws[0][1].double(), torch.log_softmax(z, 1).gather(1, want[:, None]).squeeze(1),
                 rtol=0, atol=1e-6)

"""Decode attention per run of rows (`kv_cache.key_segments`): the split, and that each run
attending over its own longest row's keys gives what one call over the longest row's keys
gives (float64, so only the summation rounding over masked columns could differ)."""
import random

import pytest
import torch

from tip_megatron.rollout.kv_cache import (
    CachedCoreAttention, Segment, SlotCache, key_segments, segment_call_cost,
)


def _check_cover(columns, segments):
    """Contiguous, in order, every row once; each run over exactly its longest row's keys."""
    assert segments[0].lo == 0 and segments[-1].hi == len(columns)
    for a, b in zip(segments, segments[1:]):
        assert a.hi == b.lo
    for s in segments:
        part = columns[s.lo:s.hi]
        assert s.hi > s.lo and s.num_keys == max(part) + 1
        assert s.full == (min(part) == max(part))


def test_runs_of_equal_columns_are_their_own_segments_when_calls_are_free():
    columns = [9, 9, 9, 4, 4, 7, 7, 7, 7, 2]
    segments = key_segments(columns, call_cost=0)
    assert segments == [Segment(0, 3, 10, True), Segment(3, 5, 5, True), Segment(5, 9, 8, True),
                        Segment(9, 10, 3, True)]


def test_one_segment_when_calls_cost_more_than_any_saving():
    columns = [9, 9, 9, 4, 4, 7, 7, 7, 7, 2]
    assert key_segments(columns, call_cost=10**9) == [Segment(0, 10, 10, False)]


def test_a_short_row_inside_a_long_run_joins_it():
    """A row moved into a hole (a shorter one, as the engine admits longest first) costs
    nothing to attend with its neighbours: no extra call for it."""
    columns = [100] * 8 + [20] + [100] * 7 + [60] * 16
    segments = key_segments(columns, call_cost=200)
    assert [(s.lo, s.hi, s.num_keys, s.full) for s in segments] == [(0, 16, 101, False), (16, 32, 61, True)]


def test_greedy_merge_rule():
    """A run joins the segment before it exactly when the row-columns it adds cost less
    than one call: here 4 rows x 10 columns = 40."""
    columns = [50] * 4 + [40] * 4
    assert len(key_segments(columns, call_cost=41)) == 1
    assert len(key_segments(columns, call_cost=40)) == 2
    columns = [40] * 4 + [50] * 4  # the longer run lengthens the segment before it
    assert len(key_segments(columns, call_cost=41)) == 1
    assert len(key_segments(columns, call_cost=40)) == 2


def test_random_columns_are_covered_exactly():
    rng = random.Random(3)
    for _ in range(200):
        columns = [rng.choice([rng.randrange(1, 300), 77]) for _ in range(rng.randrange(1, 40))]
        for cost in (0, 1, 50, 500, 10**6):
            _check_cover(columns, key_segments(columns, cost))


def test_call_cost_follows_the_device_and_the_column_size():
    assert segment_call_cost(torch.device("cpu"), 1024) == 200
    assert segment_call_cost(torch.device("cpu"), 4096) == 50
    assert segment_call_cost(torch.device("cuda"), 1024) > 100 * segment_call_cost(torch.device("cpu"), 1024)
    assert segment_call_cost(torch.device("cpu"), 0) >= 1


@pytest.mark.parametrize("gqa", [True, False])
def test_segmented_decode_attention_equals_one_call(gqa):
    """A decode step over a slot cache whose rows sit at different columns: attending per
    segment equals one masked call over the longest row's keys (float64: 1e-12)."""
    torch.manual_seed(0)
    heads, groups, hn, cap, max_len = 4, 2 if gqa else 4, 8, 12, 40
    columns = torch.tensor([30, 30, 30, 12, 12, 30, 5, 5, 5, 21, 21, 3])
    b = columns.numel()
    results = {}
    for name, cost in (("one", 10**9), ("runs", 0), ("merged", 60)):
        cache = SlotCache(capacity=cap, max_len=max_len)
        core = CachedCoreAttention(cache, 0, 0.3, heads, groups)
        prefill_k = torch.randn(31, b, groups, hn, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        prefill_v = torch.randn(31, b, groups, hn, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        causal = torch.ones(31, 31, dtype=torch.bool).tril()[None, None]
        cache.set_window(0, None, 31, causal)
        core(torch.zeros(31, b, heads, hn, dtype=torch.float64), prefill_k, prefill_v)
        segments = key_segments(columns.tolist(), cost)
        num_keys = max(s.num_keys for s in segments)
        keys = torch.arange(num_keys)
        cache.set_window(0, columns, num_keys, (keys[None, :] <= columns[:, None])[:, None, None],
                         segments=segments)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, b, n, hn, dtype=torch.float64, generator=g) for n in (heads, groups, groups))
        results[name] = (core(q, k, v), len(segments))
    assert results["one"][1] == 1 and results["runs"][1] == 6 and 1 < results["merged"][1] < 6
    for name in ("runs", "merged"):
        torch.testing.assert_close(results[name][0], results["one"][0], atol=1e-12, rtol=0)
    # And against a float64 reference built by hand: row r attends over keys [0, columns[r]].
    cache_k = torch.cat([prefill_k.permute(1, 2, 0, 3), torch.zeros(b, groups, max_len - 31, hn,
                                                                   dtype=torch.float64)], 2)
    cache_v = torch.cat([prefill_v.permute(1, 2, 0, 3), torch.zeros(b, groups, max_len - 31, hn,
                                                                   dtype=torch.float64)], 2)
    ref = []
    for r in range(b):
        c = int(columns[r])
        kr, vr = cache_k[r, :, :c + 1].clone(), cache_v[r, :, :c + 1].clone()
        kr[:, c], vr[:, c] = k[0, r], v[0, r]
        kr, vr = kr.repeat_interleave(heads // groups, 0), vr.repeat_interleave(heads // groups, 0)
        p = torch.softmax(0.3 * (q[0, r][:, None, :] * kr).sum(-1), dim=-1)  # [heads, keys]
        ref.append((p[..., None] * vr).sum(1).reshape(-1))
    torch.testing.assert_close(results["runs"][0][0], torch.stack(ref), atol=1e-12, rtol=0)

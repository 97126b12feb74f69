"""mean@k and pass@k against a direct computation: enumerate every k-subset of the samples."""
import itertools
import random

import pytest

from tip_megatron.eval import Grade, PromptCounts, Sample, count_prompts, evaluate, pass_at_k, summarize


def _pass_at_k_enumerated(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(correct, k), abs=1e-12)


def test_pass_at_k_large_n_is_finite_and_matches_exact_fraction():
    from fractions import Fraction
    from math import comb

    n, c, k = 2048, 3, 1024  # the binomials here exceed float64
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_summary_on_a_small_table():
    rng = random.Random(0)
    table = {p: [rng.random() < 0.4 for _ in range(6)] for p in range(7)}  # prompt -> verdicts
    samples = [Sample(p, s, f"r{p}{s}", "a") for p, row in table.items() for s in range(6)]
    grades = [Grade(table[s.prompt_index][s.sample_index], False, "x") for s in samples]
    counts = count_prompts(samples, grades)
    for k in (None, 1, 3):
        summary = summarize(counts, "exact", k)
        kk = 6 if k is None else k
        assert summary.k == kk and summary.samples_per_prompt == 6 and summary.num_prompts == 7
        all_verdicts = [v for row in table.values() for v in row]
        assert summary.mean_at_k == pytest.approx(sum(all_verdicts) / len(all_verdicts))
        expected = sum(_pass_at_k_enumerated(row, kk) for row in table.values()) / len(table)
        assert summary.pass_at_k == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="--pass-k 7"):
        summarize(counts, "exact", 7)


def test_summary_rejects_unequal_and_duplicate_samples():
    with pytest.raises(ValueError, match="prompt 1 has 1, prompt 0 has 2"):
        summarize([PromptCounts(0, 2, 1, 0), PromptCounts(1, 1, 0, 0)], "exact")
    twice = [Sample(0, 0, "a", "a"), Sample(0, 0, "a", "a")]
    with pytest.raises(ValueError, match="sample 0 of prompt 0 appears twice"):
        count_prompts(twice, [Grade(True, False, "a")] * 2)


def test_evaluate_counts_unparsed_as_wrong():
    samples = [Sample(0, 0, "Answer: 3", "3"), Sample(0, 1, "dunno", "3"),
               Sample(1, 0, "Answer: 4", "5"), Sample(1, 1, "Answer: 5", "5")]
    result = evaluate(samples, grader="regex")
    assert [g.correct for g in result.grades] == [True, False, False, True]
    s = result.summary
    assert (s.num_unparsed, s.num_correct, s.mean_at_k, s.pass_at_k) == (1, 2, 0.5, 1.0)
    assert s.to_dict()["grader"] == "regex"

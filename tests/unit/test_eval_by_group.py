"""mean@k per domain (`eval.route_field`): each group's correct samples over its samples."""
import pytest

from tip_megatron.eval.metrics import PromptCounts, mean_at_k_by_group


def test_mean_at_k_by_group_against_hand_counts():
    counts = [PromptCounts(0, 4, 1, 0), PromptCounts(1, 4, 4, 0), PromptCounts(2, 4, 0, 1),
              PromptCounts(3, 4, 2, 0)]
    got = mean_at_k_by_group(counts, ["math", "code", "math", "code"])
    assert got == {"code": pytest.approx(6 / 8), "math": pytest.approx(1 / 8)}
    assert list(got) == ["code", "math"]  # sorted: the same keys in the same order every step

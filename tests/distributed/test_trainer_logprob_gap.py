"""The trainer's train/inference log-prob gap metric (`logging.logprob_gap_every`) on a
tiny CPU run: on the chosen steps, metrics.jsonl carries `rollout/logprob_gap_max` and
`rollout/logprob_gap_mean` within fp32 rounding (<= 1e-5), measured over every response
token of the global batch (kept by the selection rule or not); other steps carry none. Also
under TP=2 with sequence parallelism (gloo)."""
import json

import pytest

from tip_megatron.testing.assets import tiny_run_overrides, train_history
from tip_megatron.testing.distributed import run_distributed

STEPS, EVERY = 3, 2


def _overrides(assets, run_dir, rule, rho, layout):
    return tiny_run_overrides(assets, **{
        "data.prompts_per_step": 8, "rollout.n": 2, "selection.rule": rule, "selection.rho": rho,
        "train.steps": STEPS, "train.micro_batch_size": 4, "logging.logprob_gap_every": EVERY,
        "logging.jsonl": run_dir / "metrics.jsonl", **layout})


@pytest.mark.parametrize("world,rule,rho,layout", [
    (1, "all", 1.0, {}), (2, "soft_or", 0.5, {}),
    # sequence parallelism: the training forward of the check runs with SP as the trainer's
    (2, "all", 1.0, {"parallel.tp": 2, "parallel.sequence_parallel": True, "rollout.max_new_tokens": 5})],
    ids=["tp1", "dp2", "tp2_sp"])
def test_gap_metric_in_metrics_jsonl(opd_assets, tmp_path, world, rule, rho, layout):
    run_distributed(train_history, world, args=(_overrides(opd_assets, tmp_path, rule, rho, layout),))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        if row["step"] % EVERY:
            assert "rollout/logprob_gap_max" not in row
            continue
        assert 0.0 <= row["rollout/logprob_gap_mean"] <= row["rollout/logprob_gap_max"] <= 1e-5
        # Every response token of the global batch (8 prompts x 2 samples, DP-summed),
        # not only the kept ones: rule "all" keeps exactly those, Soft-OR about half.
        tokens = row["rollout/logprob_gap_tokens"]
        assert 8 * 2 <= tokens <= 8 * 2 * 6
        if rule == "all":
            assert row["num_kept"] == tokens
        else:
            assert 0 < row["num_kept"] < tokens

"""`tip-megatron quickstart --task tools` end to end on 2 ranks (TP=2): 2 OPD steps on the
tools task's built-ins with seeded random weights cached under the real recipes' keys
(nothing is pre-trained), multi-turn rollouts through the task's environment. Checked
against the run's own files: the config it ran (environment, budget, turns), the per-turn
metrics of every step (two tool calls answered per rollout at most, the 6 observation
tokens never counted as generated), the accuracies' keys, and the summary's lines.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tip_megatron.testing.distributed import run_distributed


def _fill_cache(cache_dir: str) -> None:
    from tip_megatron.apps.quickstart import pretrain, tools_task
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.runtime import parallel

    g = parallel.initialize(parallel.ParallelLayout())
    arch = pretrain.tools_arch()
    for seed, (name, recipe) in enumerate((("tools-teacher", pretrain.TOOLS_TEACHER_RECIPE),
                                           ("tools-student", pretrain.TOOLS_STUDENT_RECIPE))):
        full = init_full_state(build_model(arch, g), g, arch, seed)
        path = pretrain.cache_path(cache_dir, name, arch, recipe, tools_task)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state_dict=full, info=dict(name=name, random=True)), path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    cache = tmp / "cache"
    run_distributed(_fill_cache, 1, args=(str(cache),))
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp / "qs"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "quickstart", "--task", "tools",
                           "--steps", "2", "--tp", "2", "--eval-every", "0", "--out", str(out),
                           "train.micro_batch_size=8", "logging.log_every=1"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quickstart_tools_runs_multi_turn_rollouts(run):
    out, stdout = run
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "tools" and result["rule"] == "q3" and result["steps"] == 2
    assert result["cases"] == [["b9", "carry after b's 9 dropped"], ["clean", ""]]
    for key in ("teacher", "before", "after"):
        assert set(result[key]) >= {"exact", "b9", "clean", "n"} and result[key]["n"] == 1000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # at most 3 turns; observations (3 tokens per answered call) never generated
        assert 1 <= r["turns/per_rollout"] <= 3
        # every turn but the last ends in an answered call of 3 tokens (fewer when cut at
        # the budget): observation tokens <= 3 x (turns - 1), per rollout and so on average
        assert r["turns/observation_tokens_per_rollout"] <= 3 * (r["turns/per_rollout"] - 1) + 1e-9
    assert "(b9: fetched register b ends in 9" in stdout and "student after OPD" in stdout

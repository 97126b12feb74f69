"""The quickstart's mid-run evaluation: the exact match it logs at a step is the one of
that step's weights, and evaluating mid-run leaves the training run unchanged.

A 2-step quickstart run (TP=1, full lr from step 1, evaluation every step, a checkpoint
every step) on the real pre-trained built-ins (the cache; trained first when absent:
minutes). Its metrics.jsonl points at steps 1 and 2 are compared with
`quickstart.evaluation.evaluate` run in a fresh process on the saved step_000001 and
step_000002 weights; the three accuracies (before, step 1, step 2) must not all be equal,
or the comparison could not tell the steps apart. A second run with --eval-every 0 has
the same per-step losses.
"""
import json
import subprocess
import sys

import pytest

from tip_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

KEYS = ("A", "B", "clean")


def _quickstart(out, every):
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "quickstart", "--steps", "2", "--tp", "1",
           "--eval-every", str(every), "--out", str(out), "logging.log_every=1",
           "optim.warmup_steps=0", f"checkpoint.dir={out / 'ck'}", "checkpoint.save_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, [json.loads(line) for line in (out / "metrics.jsonl").open()]


def _evaluate_steps(ck):
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.checkpoint.sources import ModelSource, load_source_weights
    from tip_megatron.apps.quickstart import pretrain
    from tip_megatron.apps.quickstart.evaluation import evaluate

    groups = parallel.initialize(parallel.ParallelLayout())
    arch = pretrain.student_arch()
    reports = {}
    for step in (1, 2):
        chunks = build_model(arch, groups)
        load_source_weights(chunks, groups, arch, ModelSource(ckpt=f"{ck}/step_{step:06d}"))
        reports[step] = evaluate(chunks, groups, arch)
    return reports


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("midrun")
    return _quickstart(tmp / "eval", 1), _quickstart(tmp / "no_eval", 0), tmp


def test_logged_points_are_the_steps_weights(runs):
    (stdout, records), _, tmp = runs
    assert [r["step"] for r in records if "eval/mean_at_k" in r] == [1, 2]
    reports = run_distributed(_evaluate_steps, 1, args=(str(tmp / "eval" / "ck"),))[0]
    for r in records:
        rep = reports[r["step"]]
        assert r["eval/mean_at_k"] == rep["exact"]
        assert {k: r[f"eval/{k}"] for k in KEYS} == {k: rep[k] for k in KEYS}
    before = json.loads((tmp / "eval" / "result.json").read_text())["before"]["exact"]
    assert len({before, reports[1]["exact"], reports[2]["exact"]}) > 1, "steps indistinguishable"
    assert "exact match during OPD : " in stdout


def test_mid_run_evaluation_leaves_training_unchanged(runs):
    (_, with_eval), (_, without), _ = runs
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert not any("eval/mean_at_k" in r for r in without)

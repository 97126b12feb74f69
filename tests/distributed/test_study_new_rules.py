"""`tip-megatron study` with the new spec forms end to end on the quickstart's built-ins
(seeded random weights, no pre-training): a weighted rule alone (`tip_soft`, rho 1) and a
counted rule with a mix (`q3@0.1+mix:entropy_aware`) each run, and the runs used them
(their logged weight sums and the effective config's loss.mix)."""
import json
import os
import subprocess
import sys

import pytest

from tip_megatron.testing.assets import fill_quickstart_cache
from tip_megatron.testing.distributed import run_distributed

RULES = ("tip_soft", "q3@0.1+mix:entropy_aware")


@pytest.mark.slow
def test_study_runs_weighted_rules_and_mixes(tmp_path):
    cache = tmp_path / "cache"
    run_distributed(fill_quickstart_cache, 1, args=(str(cache),))
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--rules", *RULES,
                           "--seeds", "1", "--steps", "2", "--tp", "1", "--out", str(out),
                           "data.prompts_per_step=32", "train.micro_batch_size=16"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {name: out / "runs" / name / "seed_0" for name in ("tip_soft@1", "q3@0.1+mix:entropy_aware")}
    for name, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "weight_sum" in r]
        assert len(steps) == 2, name
        if name.startswith("tip_soft"):
            assert any(r["weight_sum"] < r["num_kept"] for r in steps), "tip_soft weighs < 1 somewhere"
        else:
            assert all(r["weight_sum"] == r["num_kept"] for r in steps)  # q3: a mask
        result = json.loads((run / "result.json").read_text())  # what the run was given
        assert result["loss_mix"] == ("entropy_aware" if name.endswith("entropy_aware") else "none")
        assert result["rule"] == name.partition("@")[0]

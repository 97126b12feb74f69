"""The trainer runs on the quickstart's built-ins like on any model source: a torchrun
worker (`python -m tip_megatron.train --config run.yaml`) finds `quickstart-student` /
`quickstart-teacher` through the registry, takes their weights from the cache, their
character tokenizer and, with no `data.prompts`, their embedded addition prompts.

The cache is filled beforehand with seeded random weights (`init_full_state`) under the
real recipes' keys, so no pre-training runs (minutes); the cache being left untouched
proves the trainer loaded it rather than training.
"""
import json
import math
import os
import subprocess
import sys

from tip_megatron.runtime.env import free_port
from tip_megatron.testing.assets import fill_quickstart_cache
from tip_megatron.testing.distributed import run_distributed


def test_torchrun_worker_trains_on_the_builtins_from_a_yaml(tmp_path):
    cache = tmp_path / "cache"
    written = run_distributed(fill_quickstart_cache, 1, args=(str(cache),))[0]
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    (tmp_path / "run.yaml").write_text(
        "student: {builtin: quickstart-student}\nteacher: {builtin: quickstart-teacher}\n"
        "data: {prompts_per_step: 16, max_prompt_len: 8}\nrollout: {max_new_tokens: 4}\n"
        "selection: {rule: soft_or, rho: 0.5}\ntrain: {steps: 2, micro_batch_size: 8}\n"
        f"logging: {{jsonl: {tmp_path / 'm.jsonl'}}}\n")
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "tip_megatron.train", "--config", str(tmp_path / "run.yaml")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    # 16 prompts of the task, 4 new tokens each at most; soft_or keeps half of them
    assert 0 < rows[0]["num_response"] <= 16 * 4 and abs(rows[0]["kept_fraction"] - 0.5) < 0.1
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before, "cache rewritten"
    assert sorted(before) == sorted(written)

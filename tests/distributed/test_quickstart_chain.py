"""`tip-megatron study --task chain` end to end on 2 ranks (TP=2): one random@0.5 cell of
2 OPD steps on the chain task's built-ins (`quickstart-teacher`, `quickstart-chain-student`),
then the report with the chain task's case columns. The numbers are checked against the
run's own files, the case of each dumped token against a plain-Python rule, and the cache
(seeded random weights under the real recipes' keys, as in test_study_command) is left
untouched: nothing is pre-trained. A bad --task is one line.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tip_megatron.testing.distributed import run_distributed


def _fill_cache(cache_dir: str) -> list[str]:
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.apps.quickstart import chain_task, pretrain, task

    g = parallel.initialize(parallel.ParallelLayout())
    written = []
    for seed, (name, arch, recipe, data) in enumerate((
            ("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE, task),
            ("chain-student", pretrain.chain_student_arch(), pretrain.CHAIN_STUDENT_RECIPE,
             chain_task))):
        full = init_full_state(build_model(arch, g), g, arch, seed)
        path = pretrain.cache_path(cache_dir, name, arch, recipe, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state_dict=full, info=dict(name=name, random=True)), path)
        written.append(path.name)
    return written


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    cache = tmp / "cache"
    run_distributed(_fill_cache, 1, args=(str(cache),))
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp / "study"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--task", "chain",
                           "--rules", "random@0.5", "--seeds", "1", "--steps", "2", "--tp", "2",
                           "--out", str(out), "train.micro_batch_size=8"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before, "cache rewritten"
    return out, proc.stdout


def _is_chain(prompt_ids: list[int]) -> bool:
    a, b = prompt_ids[0:3], prompt_ids[4:7]
    return a[2] + b[2] >= 10 and a[1] + b[1] == 9


def test_run_uses_the_chain_recipe_and_its_cases(study):
    out, stdout = study
    run = out / "runs" / "random@0.5" / "seed_0"
    result = json.loads((run / "result.json").read_text())
    assert result["task"] == "chain" and result["tp"] == 2 and result["steps"] == 2
    assert result["cases"] == [["chain", "carry through tens dropped"], ["clean", ""]]
    assert result["prompts_per_step"] == 16                      # the chain task's recipe
    for key in ("teacher", "before", "after"):
        assert set(result[key]) >= {"exact", "chain", "clean", "n"}
    assert "(chain:" in stdout and "A:" not in stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]


def test_report_has_the_chain_columns_and_the_runs_numbers(study):
    out, _ = study
    md = (out / "study.md").read_text()
    result = json.loads((out / "runs" / "random@0.5" / "seed_0" / "result.json").read_text())
    assert md.startswith("Embedded chain task, 2 OPD steps, TP=2;")
    assert "| rule | seeds | exact | chain (carry through tens dropped) | clean | final loss |" in md
    assert "| rule | Q1 | Q2 | Q3 | Q4 | chain | clean |" in md
    after = result["after"]
    row = (f"| random@0.5 | 1 | {100 * after['exact']:.1f} ± 0.0 | {100 * after['chain']:.1f} ± 0.0 | "
           f"{100 * after['clean']:.1f} ± 0.0 |")
    assert row in md, md
    before = result["before"]
    assert (f"Student before OPD: {100 * before['exact']:.1f}% (chain {100 * before['chain']:.1f}%, "
            f"clean {100 * before['clean']:.1f}%).") in md


def test_kept_share_per_case_from_the_dumps(study):
    from tip_megatron.apps.quickstart import task

    out, _ = study
    run = out / "runs" / "random@0.5" / "seed_0"
    table = json.loads((out / "study.json").read_text())["random@0.5"]["kept"]
    kept = {True: [], False: []}
    for path in sorted((run / "token_dumps").glob("*.npz")):
        d = np.load(path)
        step = int(d["step"])
        # the step's prompts, as the built-in prompt source draws them (data.seed 1234)
        prompts = task.sample_prompts(16, torch.Generator().manual_seed(1234 * 1_000_003 + step - 1))
        chain = np.array([_is_chain(p) for p in prompts.tolist()])[d["rollout_id"]]
        for flag in (True, False):
            kept[flag].extend(d["kept"][chain == flag].tolist())
    assert kept[False], "no clean tokens dumped"
    assert table["clean"]["mean"] == pytest.approx(np.mean(kept[False]), abs=1e-12)
    if kept[True]:
        assert table["chain"]["mean"] == pytest.approx(np.mean(kept[True]), abs=1e-12)
    else:
        assert np.isnan(table["chain"]["mean"])


@pytest.mark.parametrize("command", ["quickstart", "study"])
def test_bad_task_is_one_line(command, tmp_path):
    extra = ["--rules", "all"] if command == "study" else []
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", command, "--task", "chian",
                           *extra, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"error: --task 'chian': accepted tasks: addition, chain, multi, tools\n", proc.stderr), \
        proc.stderr


def _pretrain_chain_student(cache_dir: str) -> dict:
    from tip_megatron.runtime import parallel
    from tip_megatron.apps.quickstart import chain_task, pretrain

    g = parallel.initialize(parallel.ParallelLayout(tp=2))
    _, info = pretrain.pretrained_model(cache_dir, "chain-student", pretrain.chain_student_arch(),
                                        pretrain.CHAIN_STUDENT_RECIPE, g, data=chain_task)
    return info


@pytest.mark.slow
def test_chain_student_recipe_learns_its_defect(tmp_path):
    """The full recipe (a few minutes): correct sums except the chain case, where the
    student follows its data (docs/quickstart.md: 95.9% exact, chain 0%, clean 100%)."""
    info = run_distributed(_pretrain_chain_student, world_size=2, args=(str(tmp_path),),
                           timeout_s=1800)[0]
    acc = info["accuracy"]
    assert acc["clean"] >= 0.98 and acc["student_rule"] >= 0.95, acc
    assert acc["chain"] <= 0.05, acc
    assert list(tmp_path.glob("chain-student-t1-c1-*.pt")), list(tmp_path.iterdir())

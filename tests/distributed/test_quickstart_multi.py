"""The multi task's quickstart (issue 23's embedded demo, single-teacher half) on 2 ranks.

- `quickstart --task multi --teacher sub`, 2 OPD steps at TP=2 on seeded random weights
  under the real recipes' cache keys (nothing is pre-trained; the cache is left as it was):
  the multi task's built-ins are found in an install whose entry points predate them, the
  prompts come from the run's prompt file (each record with its `domain`), and the
  accuracies are reported per domain and per case.
- slow: the three pre-trained built-ins (from the cache, else trained, minutes) hold the
  claims of docs/quickstart.md: each specialist ~100% on its domain and near 17% (the
  problems with no carry / borrow) on the other; the student 0% on each planted case and
  ~100% elsewhere. The engine's report (`evaluate`) equals `multi_task.accuracy_report` of
  the greedy answers generated directly.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tip_megatron.testing.distributed import run_distributed

BUILTINS = ("quickstart-multi-teacher-add", "quickstart-multi-teacher-sub", "quickstart-multi-student")


def _fill_cache(cache_dir: str) -> list[str]:
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.apps.quickstart import builtin_models, pretrain

    g = parallel.initialize(parallel.ParallelLayout())
    written = []
    for seed, builtin in enumerate(BUILTINS):
        name, arch, recipe, data = builtin_models._cache_entry(builtin)
        full = init_full_state(build_model(arch, g), g, arch, seed)
        path = pretrain.cache_path(cache_dir, name, arch, recipe, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state_dict=full, info=dict(name=name, random=True)), path)
        written.append(path.name)
    return written


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    cache = tmp / "cache"
    run_distributed(_fill_cache, 1, args=(str(cache),))
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "quickstart", "--task", "multi",
                           "--teacher", "sub", "--steps", "2", "--tp", "2", "--out", str(out),
                           "train.micro_batch_size=8", "data.prompts_per_step=16", "logging.log_every=1"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before, "cache rewritten"
    return out, proc.stdout


def test_single_teacher_run_reports_per_domain_and_case(run):
    out, stdout = run
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "multi" and result["steps"] == 2 and result["tp"] == 2
    for key in ("teacher", "before", "after"):
        assert set(result[key]) >= {"exact", "add", "sub", "add_carry", "add_clean",
                                    "sub_borrow", "sub_clean", "n"}, result[key]
        # per domain = the mean over its cases, weighted by their counts: n/2 per domain
        assert result[key]["n"] == 2000
    assert "add:" in stdout and "sub_borrow:" in stdout and "(add_carry / sub_borrow:" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]


def test_prompts_come_from_the_file_with_the_route_field(run):
    from tip_megatron.apps.quickstart import multi_task, task

    out, _ = run
    rows = [json.loads(line) for line in (out / "prompts.jsonl").open()]
    assert len(rows) == 32768 and {r["domain"] for r in rows} == {"add", "sub"}
    tok = multi_task.tokenizer()
    ids = torch.tensor([tok.encode(r["prompt"]) for r in rows[:2000]])
    assert multi_task.domain_index(ids).tolist() == [multi_task.DOMAINS.index(r["domain"]) for r in rows[:2000]]
    assert not task.is_held_out(*multi_task.decode_problems(ids)[:2]).any()
    dumps = sorted((out / "token_dumps").glob("step_*.npz"))
    assert dumps, "no token dumps"


def _check_pretrained(cache_dir: str) -> dict:
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.apps.quickstart import builtin_models, multi_task, pretrain
    from tip_megatron.apps.quickstart.evaluation import evaluate
    from tip_megatron.rollout.generate import GenerationConfig, generate

    g = parallel.initialize(parallel.ParallelLayout(tp=2))
    prompts = multi_task.eval_set(2000)
    greedy = GenerationConfig(n=1, max_new_tokens=multi_task.ANSWER_LEN, temperature=0.0, pad_id=13)
    reports = {}
    for builtin in BUILTINS:
        name, arch, recipe, data = builtin_models._cache_entry(builtin)
        full, info = pretrain.pretrained_model(cache_dir, name, arch, recipe, g, data=data)
        chunks = build_model(arch, g)
        load_full_state_dict(chunks, full, g, arch)
        answers = generate(chunks, g, arch, prompts.tolist(), greedy, seed=0).token_ids[:, 8:].cpu()
        reports[builtin] = (evaluate(chunks, g, arch, 2000, student_rule=True, data=multi_task),
                            multi_task.accuracy_report(prompts, answers))
    return reports


@pytest.mark.slow
def test_pretrained_specialists_and_student_hold_their_claims():
    from tip_megatron.apps.quickstart.builtin_models import cache_dir

    reports = run_distributed(_check_pretrained, world_size=2, args=(str(cache_dir()),),
                              timeout_s=3600)
    for rank in reports:
        for builtin, (engine, direct) in rank.items():
            assert engine == pytest.approx(direct, nan_ok=True), builtin
    r = {k: v[1] for k, v in reports[0].items()}
    add, sub, student = (r[b] for b in BUILTINS)
    assert add["add"] >= 0.99 and sub["sub"] >= 0.99, (add, sub)
    # off their domain: right about where no column carries / borrows (0.55^3 = 17%)
    assert add["sub"] <= 0.35 and sub["add"] <= 0.35, (add, sub)
    assert student["add_carry"] <= 0.02 and student["sub_borrow"] <= 0.02, student
    assert student["add_clean"] >= 0.98 and student["sub_clean"] >= 0.98, student
    assert student["student_rule"] >= 0.98, student


@pytest.mark.slow
def test_study_of_the_multi_task_has_a_teacher_axis(tmp_path):
    """`study --task multi`: one cell per (rule, teacher) on the same seeded random weights;
    its table holds each run's accuracies per domain and case, and the planted case of every
    dumped token (found through the run's prompt file and the trainer's sampler) agrees with
    the engine's own routing: the tokens of addition cases in a step's dump are exactly what
    the `add` teacher scored in that step (`teacher/add/num_response`)."""
    cache = tmp_path / "cache"
    run_distributed(_fill_cache, 1, args=(str(cache),))
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--task", "multi",
                           "--rules", "all", "--teachers", "add", "both", "--seeds", "1", "--steps", "2",
                           "--tp", "1", "--out", str(out), "train.micro_batch_size=8",
                           "data.prompts_per_step=16"], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert list(table) == ["all+teacher:add", "all+teacher:both"]
    assert "| rule | seeds | exact | add | sub | add_carry (units carry dropped) | add_clean |" in md, md
    for label in table:
        run_dir = out / "runs" / label / "seed_0"
        result = json.loads((run_dir / "result.json").read_text())
        assert result["teachers_run"] == label.split(":")[-1]
        for key in ("exact", "add", "sub", "add_carry", "sub_borrow"):
            assert table[label]["after"][key]["mean"] == pytest.approx(result["after"][key], nan_ok=True)
    both = out / "runs" / "all+teacher:both" / "seed_0"
    metrics = {r["step"]: r for r in map(json.loads, (both / "metrics.jsonl").open()) if "loss" in r}
    from tip_megatron.apps.study.report import dump_cases
    from tip_megatron.train.dump_file import read_token_dump

    result = json.loads((both / "result.json").read_text())
    dumps = sorted((both / "token_dumps").glob("step_*.npz"))
    assert dumps
    for path in dumps:
        d = read_token_dump(path)
        assert len(d.rollout_id) == d.num_response_tokens  # the whole step was dumped
        cases = dump_cases(result, int(d.step), d.rollout_id, both)
        add_tokens = int((cases <= 1).sum())  # add_carry, add_clean
        assert add_tokens == metrics[int(d.step)]["teacher/add/num_response"], path
        assert len(cases) - add_tokens == metrics[int(d.step)]["teacher/sub/num_response"], path

"""`tip-megatron eval --ckpt <run>/step_N` grades the very samples that validation during
training graded at step N, for the same options and seed (the one sharded loop,
eval/sharded.py): same texts, same grades. Training runs as two DP replicas; the eval runs
as one process (DP=1) and as two (DP=2), and all three agree.

The texts validation graded are taken where they are graded: the run's grader is a
recording grader registered here (the ranks are forked and inherit it) that appends every
(answer, response, grade) it sees to a file of its process. A tiny random model answers
no question, so the grade is the parity of the response's length (both outcomes occur).
"""
import json
import os
from collections import Counter

import pytest

from tip_megatron.eval import GRADERS, Grade, register_grader
from tip_megatron.testing.assets import cli_main, imported_hf_model, train_history, write_jsonl
from tip_megatron.testing.distributed import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CORPUS = ["the answer is 12", "so 12+34 = 46 and 7 * 6 = 42", "what is 1/2 of 84? it is 42",
          "the quick brown fox jumps over the lazy dog"] * 8
# Five prompts: two DP replicas take uneven contiguous slices (3 and 2).
ROWS = [{"prompt": "what is 12+34?", "answer": "46"}, {"prompt": "the answer is", "answer": "12"},
        {"prompt": "half of 84", "answer": "42"}, {"prompt": "the quick brown", "answer": "fox"},
        {"prompt": "7 * 6 =", "answer": "42"}]
N, NEW, SEED = 3, 8, 7
RECORDER = "_test_recording_parity"
LOG = {"prefix": None}


def _recording_grade(text: str, answer: str) -> Grade:
    grade = Grade(len(text) % 2 == 0, False, str(len(text)))
    if LOG["prefix"]:
        with open(f"{LOG['prefix']}.{os.getpid()}", "a", encoding="utf-8") as f:
            f.write(json.dumps([answer, text, grade.correct]) + "\n")
    return grade


if RECORDER not in GRADERS:
    register_grader(RECORDER, lambda: _recording_grade)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_vs_validation")
    imported_hf_model(work / "hf_student", work / "student", seed=5, corpus=CORPUS)
    imported_hf_model(work / "hf_teacher", work / "teacher", seed=6, corpus=CORPUS)
    write_jsonl(work / "bench.jsonl", ROWS)
    return work


def _train(work) -> list[dict]:
    """Two DP replicas train 2 steps with validation at steps 1 and 2 and a checkpoint at
    each; returns the logged metrics."""
    bench = work / "bench.jsonl"
    overrides = {
        "student.ckpt": work / "student", "teacher.ckpt": work / "teacher",
        "data.prompts": f"[{bench}]", "data.tokenizer": work / "student" / "tokenizer",
        "data.prompts_per_step": 4, "data.max_prompt_len": 16, "rollout.max_new_tokens": 6,
        "optim.lr": 0.01, "optim.warmup_steps": 0, "train.steps": 2,
        "train.micro_batch_size": 2, "logging.log_every": 1,
        "eval.every": 1, "eval.prompts": f"[{bench}]", "eval.n": N, "eval.temperature": 1.0,
        "eval.max_new_tokens": NEW, "eval.grader": RECORDER, "eval.seed": SEED,
        "eval.batch_size": 2, "checkpoint.dir": work / "run", "checkpoint.save_every": 1,
    }
    hist = [h for h in run_distributed(train_history, 2, args=([f"{k}={v}" for k, v in overrides.items()],)) if h]
    assert len(hist) == 1
    return hist[0]


def _eval(work, world: int, step: int) -> tuple[list[dict], dict]:
    tag = f"eval_dp{world}_step{step}"
    argv = ["eval", "--ckpt", str(work / "run" / f"step_{step:06d}"), "--prompts",
            str(work / "bench.jsonl"), "--n", str(N), "--temperature", "1.0",
            "--max-new-tokens", str(NEW), "--seed", str(SEED), "--batch-size", "2",
            "--grader", RECORDER, "--out", str(work / f"{tag}.jsonl"),
            "--json", str(work / f"{tag}.json"), "--no-progress"]
    assert run_distributed(cli_main, world, args=(argv,)) == [0] * world
    lines = [json.loads(x) for x in (work / f"{tag}.jsonl").read_text().splitlines()]
    return lines, json.loads((work / f"{tag}.json").read_text())


def _recorded(prefix) -> Counter:
    out = Counter()
    for path in prefix.parent.glob(prefix.name + ".*"):
        out.update(tuple(json.loads(x)) for x in path.read_text().splitlines())
    return out


def test_eval_ckpt_grades_what_validation_graded(work):
    LOG["prefix"] = str(work / "validation_grades")
    try:
        history = _train(work)
    finally:
        LOG["prefix"] = None
    validated = _recorded(work / "validation_grades")
    # Steps 1 and 2 validated (the grader saw both steps' samples): keep them apart by
    # evaluating each step's checkpoint and matching the union.
    evals = {step: _eval(work, 1, step) for step in (1, 2)}
    union = Counter()
    for step, (lines, summary) in evals.items():
        union.update((x["answer"], x["text"], x["correct"]) for x in lines)
        logged = next(r for r in history if r["step"] == step)
        assert logged["eval/mean_at_k"] == pytest.approx(summary["mean_at_k"], abs=1e-12)
        assert logged["eval/pass_at_k"] == pytest.approx(summary["pass_at_k"], abs=1e-12)
    assert union == validated, "eval --ckpt graded other samples than validation"
    lines1, _ = evals[1]
    assert [(x["prompt_index"], x["sample_index"]) for x in lines1] == [
        (p, s) for p in range(len(ROWS)) for s in range(N)]
    assert len({x["text"] for x in lines1}) > len(ROWS)  # sampled, not one string per prompt
    assert 0 < sum(x["correct"] for x in lines1) < len(lines1)  # both grades occur
    assert {x["text"] for x in lines1} != {x["text"] for x in evals[2][0]}, \
        "the two steps' weights sample alike: the comparison could not tell them apart"
    dp2_lines, dp2_summary = _eval(work, 2, 1)
    assert dp2_lines == lines1 and dp2_summary == evals[1][1]

"""`tip-megatron eval --ckpt`: generate in-engine (generate's own code path) and grade. At a
fixed seed, TP=1 (one process) and TP=2 (a torchrun-like world of two) give identical
per-sample results and summaries, and every grade equals the grader applied directly to
the sampled text. One launch per layout.

A tiny random model answers no math question, so the graded runs use a grader registered
here in one line (the ranks are forked and inherit it): correct iff the response has an
even number of characters, which splits random samples into both outcomes.
"""
import json

import pytest

from tip_megatron.eval import GRADERS, Grade, register_grader
from tip_megatron.testing.assets import cli_main, imported_hf_model, write_jsonl
from tip_megatron.testing.distributed import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("math_verify")

CORPUS = ["the answer is 12", "so 12+34 = 46 and 7 * 6 = 42", "what is 1/2 of 84? it is 42",
          "the quick brown fox jumps over the lazy dog"] * 8
ROWS = [{"prompt": "what is 12+34?", "answer": "46"}, {"id": "q2", "prompt": "the answer is", "answer": "12"},
        {"prompt": "half of 84", "answer": "42"}]
N, NEW = 4, 10
PARITY = "_test_even_length"

if PARITY not in GRADERS:
    register_grader(PARITY, lambda: lambda text, answer: Grade(len(text) % 2 == 0, False, str(len(text))))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_cli")
    imported_hf_model(work / "hf", work / "ckpt", seed=5, corpus=CORPUS)
    write_jsonl(work / "bench.jsonl", ROWS)
    return work


def _eval(work, world, tag, *extra):
    argv = ["eval", "--ckpt", str(work / "ckpt"), "--prompts", str(work / "bench.jsonl"),
            "--n", str(N), "--temperature", "1.0", "--max-new-tokens", str(NEW), "--seed", "7",
            "--batch-size", "2", "--json", str(work / f"{tag}.json"), "--pass-k", "2",
            "--grader", PARITY, *extra]
    assert run_distributed(cli_main, world, args=(argv,)) == [0] * world
    return json.loads((work / f"{tag}.json").read_text())


def test_eval_ckpt_tp1_equals_tp2_and_direct_grading(work):
    from tip_megatron.eval import get_grader, pass_at_k

    one = _eval(work, 1, "tp1")  # default --out: beside the benchmark
    lines1 = [json.loads(x) for x in (work / "bench.ckpt.graded.jsonl").read_text().splitlines()]
    two = _eval(work, 2, "tp2", "--tp", "2", "--out", str(work / "tp2.jsonl"))
    lines2 = [json.loads(x) for x in (work / "tp2.jsonl").read_text().splitlines()]
    assert lines1 == lines2 and one == two
    assert [(x["prompt_index"], x["sample_index"]) for x in lines1] == [
        (p, s) for p in range(len(ROWS)) for s in range(N)]
    assert [x["answer"] for x in lines1[::N]] == [r["answer"] for r in ROWS]
    assert len({x["text"] for x in lines1}) > 1  # sampled, not one repeated string
    grade = get_grader(PARITY)
    for x in lines1:
        g = grade(x["text"], x["answer"])
        assert (x["correct"], x["unparsed"], x["extracted"]) == (g.correct, g.unparsed, g.extracted)
    correct = [sum(x["correct"] for x in lines1[p * N:(p + 1) * N]) for p in range(len(ROWS))]
    assert 0 < sum(correct) < N * len(ROWS)  # both outcomes occur: the check can fail
    assert one["num_prompts"] == 3 and one["samples_per_prompt"] == N and one["k"] == 2
    assert one["mean_at_k"] == pytest.approx(sum(correct) / (N * len(ROWS)))
    assert one["pass_at_k"] == pytest.approx(sum(pass_at_k(N, c, 2) for c in correct) / len(ROWS))
    assert one["num_unparsed"] == sum(x["unparsed"] for x in lines1)

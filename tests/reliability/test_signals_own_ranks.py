"""`tip-megatron generate` and `eval` with --tp 2 from a plain shell start their own two
ranks (through the launcher `train` uses) and produce exactly what the same command gives
in a torchrun-like world of two ranks (forked ranks: `run_distributed`). Sampled with
`--n 2`, which the launcher must pass on as `--num-samples` (torchrun would take `--n`
for an abbreviation of its own options). Slow tier: each plain-shell run starts torchrun.
"""
import json
import subprocess
import sys

import pytest

from tip_megatron.testing.assets import cli_main, imported_hf_model, write_jsonl
from tip_megatron.testing.distributed import run_distributed

from signal_helpers import ENV, gone, tree

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, what is 12+34?"] * 10
ROWS = [{"prompt": "hello world", "answer": "42"}, {"prompt": "the quick brown fox", "answer": "dog"},
        {"prompt": "what is", "answer": "46"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("own_ranks")
    imported_hf_model(work / "hf", work / "ckpt", seed=3, corpus=CORPUS)
    write_jsonl(work / "prompts.jsonl", ROWS)
    return work


def _plain_shell(argv):
    """`tip-megatron ARGV` as a user types it; returns its output and every pid it had."""
    proc = subprocess.Popen([sys.executable, "-m", "tip_megatron.apps.cli", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    while True:
        seen |= tree(proc.pid)
        try:
            out, _ = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 0, out[-3000:]
    assert all(gone(p) for p in seen)
    return out, seen


def _generate_argv(work, out):
    return ["generate", "--ckpt", str(work / "ckpt"), "--prompts", str(work / "prompts.jsonl"),
            "--out", str(out), "--max-new-tokens", "6", "--tp", "2", "--n", "2",
            "--temperature", "0.8", "--seed", "5"]


def test_generate_tp2_from_a_plain_shell(work):
    _, seen = _plain_shell(_generate_argv(work, work / "shell.jsonl"))
    assert len(seen) >= 4, "expected the command, torchrun and two ranks"
    assert run_distributed(cli_main, 2, args=(_generate_argv(work, work / "forked.jsonl"),)) == [0, 0]
    shell = [json.loads(line) for line in (work / "shell.jsonl").read_text().splitlines()]
    forked = [json.loads(line) for line in (work / "forked.jsonl").read_text().splitlines()]
    assert [(x["prompt_index"], x["sample_index"]) for x in shell] == [(p, s) for p in range(3) for s in range(2)]
    assert shell == forked


def test_eval_tp2_from_a_plain_shell(work):
    def argv(tag):
        return ["eval", "--ckpt", str(work / "ckpt"), "--prompts", str(work / "prompts.jsonl"),
                "--max-new-tokens", "6", "--tp", "2", "--n", "2", "--temperature", "0.8",
                "--grader", "exact", "--no-progress", "--out", str(work / f"{tag}.graded.jsonl"),
                "--json", str(work / f"{tag}.json")]

    out, _ = _plain_shell(argv("shell"))
    assert "mean@2" in out
    assert run_distributed(cli_main, 2, args=(argv("forked"),)) == [0, 0]
    shell = json.loads((work / "shell.json").read_text())
    assert shell == json.loads((work / "forked.json").read_text())
    assert shell["num_samples"] == 6
    assert (work / "shell.graded.jsonl").read_text() == (work / "forked.graded.jsonl").read_text()

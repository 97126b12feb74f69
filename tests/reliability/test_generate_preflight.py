"""`tip-megatron generate` / `eval` with --tp > 1 from a plain shell check their inputs
before they start any rank (issue 21: these failed in the ranks after the model loaded,
under torchrun's failure dump): exit code 2, one line naming the option or the file, and
no child process (torchrun) was ever started. The tiny model has 8 heads (2 KV heads), 64
positions and 300 ids; its BPE tokenizer 280 (fewer than the model: accepted, and every
sampled id decodes)."""
import json
import subprocess
import sys
import time

import psutil
import pytest

from tip_megatron.testing.assets import imported_hf_model, write_jsonl

from signal_helpers import ENV, gone, tree

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate_preflight")
    imported_hf_model(work / "hf", work / "ckpt", seed=3, corpus=["hello world, what is 12+34?"] * 20)
    write_jsonl(work / "prompts.jsonl", [{"prompt": "hello world", "answer": "42"}] * 3)
    (work / "bad_line.jsonl").write_text(json.dumps({"prompt": "hello", "answer": "1"}) + "\n{oops\n")
    return work


def _command(argv):
    """`tip-megatron ARGV`: (exit code, stderr, pids of children seen while it ran)."""
    proc = subprocess.Popen([sys.executable, "-m", "tip_megatron.apps.cli", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = set()
    while proc.poll() is None:
        children |= tree(proc.pid) - {proc.pid}
        time.sleep(0.02)
    _, err = proc.communicate()
    return proc.returncode, err, children


def _generate(work, *extra, prompts="prompts.jsonl"):
    return ["generate", "--ckpt", str(work / "ckpt"), "--prompts", str(work / prompts),
            "--out", str(work / "out.jsonl"), *extra]


def _eval(work, *extra):
    return ["eval", "--ckpt", str(work / "ckpt"), "--prompts", str(work / "prompts.jsonl"),
            "--grader", "exact", "--no-progress", *extra]


@pytest.mark.parametrize("case", ["tp3", "derived_prompt_len", "bad_line", "eval_tp3"])
def test_refused_before_any_rank(work, case):
    argv, text = {
        "tp3": (_generate(work, "--tp", "3", "--max-new-tokens", "8"), "error: --tp 3 --pp 1: "),
        "derived_prompt_len": (_generate(work, "--tp", "2"),  # the default 256 > 64 positions
                               "error: --max-new-tokens 256: leaves no room for a prompt in the model's "
                               "max_position_embeddings=64"),
        "bad_line": (_generate(work, "--tp", "2", "--max-new-tokens", "8", prompts="bad_line.jsonl"),
                     f"error: {work / 'bad_line.jsonl'}, line 2: invalid JSON"),
        "eval_tp3": (_eval(work, "--tp", "3", "--max-new-tokens", "8"), "error: --tp 3 --pp 1: "),
    }[case]
    rc, err, children = _command(argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err[-3000:]
    # generate prints `error: ...`, eval `tip-megatron eval: error: ...`
    assert len(lines) == 1 and text in lines[0] and lines[0].index("error: ") <= len("tip-megatron eval: "), err[-3000:]
    assert "max-prompt-len -" not in err
    assert not any("torch.distributed.run" in " ".join(_cmdline(p)) for p in children), children
    assert all(gone(p) for p in children)


def _cmdline(pid):
    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []

"""`tip-megatron eval --samples` end to end through the CLI (a generate-format file in,
graded JSONL + summary out), and every bad input as one line on stderr with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tip_megatron.apps.cli import main
from tip_megatron.eval.metrics import pass_at_k

pytest.importorskip("math_verify")

# (prompt_id, answer, responses): generate's layout, one line per sample.
PROMPTS = [("bench.jsonl:1", "1/2", [r"so \boxed{\frac12}", r"\boxed{0.5}", "no idea", r"\boxed{2}"]),
           ("q2", "34", [r"\boxed{33}", r"\boxed{35}", r"\boxed{34}", " 34 "]),
           ("bench.jsonl:3", r"\sqrt{2}", [r"\boxed{2}", r"\boxed{\foo{}}", "", "maybe 3"])]
EXPECTED = [[True, True, False, False], [False, False, True, True], [False, False, False, False]]
UNPARSED = [[False, False, True, False], [False] * 4, [False, True, True, False]]


def _write_samples(path: Path, with_answers: bool = True) -> None:
    lines = []
    for p, (pid, answer, responses) in enumerate(PROMPTS):
        for s, text in enumerate(responses):
            line = dict(prompt_id=pid, prompt_index=p, sample_index=s, token_ids=[1, 2, 3],
                        text=text, finish_reason="stop", num_prompt_tokens=5)
            if with_answers:
                line["answer"] = answer
            lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")


def _bench(path: Path) -> None:
    rows = [{"prompt": "half?", "answer": "1/2"}, {"id": "q2", "prompt": "34?", "answer": 34},
            {"prompt": "root two?", "answer": r"\sqrt{2}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_samples_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="tip_megatron.eval")
    _write_samples(tmp_path / "samples.jsonl")
    assert main(["eval", "--samples", str(tmp_path / "samples.jsonl"), "--json",
                 str(tmp_path / "summary.json"), "--pass-k", "2"]) == 0
    graded = [json.loads(x) for x in (tmp_path / "samples.graded.jsonl").read_text().splitlines()]
    assert [[g["correct"] for g in graded[p * 4:(p + 1) * 4]] for p in range(3)] == EXPECTED
    assert [[g["unparsed"] for g in graded[p * 4:(p + 1) * 4]] for p in range(3)] == UNPARSED
    assert (graded[0]["extracted"], graded[0]["normalized"]) == (r"\boxed{\frac12}", r"\frac{1}{2}")
    assert (graded[1]["extracted"], graded[1]["normalized"]) == (r"\boxed{0.5}", r"\frac{1}{2}")
    assert graded[2]["extracted"] is None and graded[2]["normalized"] is None
    assert "token_ids" not in graded[0] and graded[0]["prompt_id"] == "bench.jsonl:1"
    summary = json.loads((tmp_path / "summary.json").read_text())
    c = [sum(row) for row in EXPECTED]
    assert summary == {"grader": "math", "num_prompts": 3, "num_samples": 12,
                       "samples_per_prompt": 4, "k": 2, "mean_at_k": sum(c) / 12,
                       "pass_at_k": pytest.approx(sum(pass_at_k(4, x, 2) for x in c) / 3),
                       "num_correct": sum(c), "num_unparsed": sum(map(sum, UNPARSED))}
    out = capsys.readouterr().out
    assert "mean@4" in out and "pass@2" in out and "33.33%" in out
    progress = [r.getMessage() for r in caplog.records if "graded" in r.getMessage()]
    assert progress[-1].startswith("graded: 12/12 samples (100%") and len(progress) == 12


def test_eval_regrades_its_own_output_and_joins_answers(tmp_path):
    _write_samples(tmp_path / "bare.jsonl", with_answers=False)
    _bench(tmp_path / "bench.jsonl")
    out = tmp_path / "g.jsonl"
    assert main(["eval", "--samples", str(tmp_path / "bare.jsonl"), "--answers",
                 str(tmp_path / "bench.jsonl"), "--out", str(out), "--no-progress"]) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["correct"] for g in first] == [v for row in EXPECTED for v in row]
    assert [g["answer"] for g in first[::4]] == ["1/2", "34", r"\sqrt{2}"]
    again = tmp_path / "again.jsonl"  # a graded file is a samples file
    assert main(["eval", "--samples", str(out), "--out", str(again), "--grader", "exact"]) == 0
    exact = [json.loads(x) for x in again.read_text().splitlines()]
    assert [g["correct"] for g in exact] == [i == 7 for i in range(12)]  # only " 34 " == "34"
    assert [g["unparsed"] for g in exact] == [i == 10 for i in range(12)]  # only "" is empty


def _bad(tmp_path, capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tip-megatron eval: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare.jsonl"
    _write_samples(bare, with_answers=False)
    _bad(tmp_path, capsys, ["eval", "--samples", str(bare)],
         f"{bare}, line 1: no 'answer' field", "--answers")
    good = tmp_path / "s.jsonl"
    _write_samples(good)
    _bad(tmp_path, capsys, ["eval", "--samples", str(good), "--grader", "mathh"],
         "grader 'mathh' is not registered", "'exact', 'math', ", "'regex'")
    _bad(tmp_path, capsys, ["eval", "--samples", str(good), "--pass-k", "5"],
         "--pass-k 5", "samples per prompt = 4")
    _bad(tmp_path, capsys, ["eval", "--samples", str(tmp_path / "missing.jsonl")],
         "missing.jsonl does not exist", ".jsonl")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"prompt_index": 0, "sample_index": 0, "answer": "1"}) + "\n")
    _bad(tmp_path, capsys, ["eval", "--samples", str(no_text)], f"{no_text}, line 1: field 'text'")
    _bad(tmp_path, capsys, ["eval", "--samples", str(good), "--grader", "regex", "--grader-option",
                            "pattern=(a)(b)"], "needs exactly one")
    _bad(tmp_path, capsys, ["eval", "--samples", str(good), "--grader-option", "nokey"], "KEY=VALUE")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "math_verify", None)  # as if not installed: import raises ImportError
        _bad(tmp_path, capsys, ["eval", "--samples", str(good)], "math-verify", "tip_megatron[eval]")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2?"}) + "\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _bad(tmp_path, capsys, ["eval", "--ckpt", str(ckpt), "--prompts", str(bench)],
         f"{bench}, line 2: no 'answer' field")
    bench.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    _bad(tmp_path, capsys, ["eval", "--ckpt", str(ckpt), "--prompts", str(bench)],
         f"{bench}, line 1: no 'prompt' or 'messages' field")


def test_bad_checkpoint_through_the_console(tmp_path):
    # A directory that is no checkpoint fails in the generate path (after the preflight):
    # one line, no traceback, exit 2 -- checked in a fresh process, as a user runs it.
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "notackpt").mkdir()
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "eval", "--ckpt",
                           str(tmp_path / "notackpt"), "--prompts", str(bench)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert lines == [f"tip-megatron eval: error: {tmp_path / 'notackpt'} is neither a tip_megatron "
                     "model checkpoint (meta.json is missing) nor a training checkpoint (a "
                     "step_NNNNNN directory with COMPLETE, or a run directory holding them); "
                     "create a model checkpoint with `tip-megatron convert hf-to-mcore`"], proc.stderr

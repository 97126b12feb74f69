"""tools/prepare_data.py on tiny files in the published column layouts of DAPO-Math-17k
(parquet), MATH-500 and AIME 2024/2025 (JSONL, and parquet); the output rows, and that the
engine's prompt loader reads them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
             "to the problem.\n\n")
DAPO_TAIL = "\n\nRemember to put your answer on its own line after \"Answer:\"."
BOXED = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def _tool(*argv):
    return subprocess.run([sys.executable, str(TOOL), *map(str, argv)], capture_output=True,
                          text=True, timeout=120)


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _dapo_parquet(path):
    problems = ["Find $x$ if $2x = {10}$.", "Compute $\\frac{1}{2}+\\frac{1}{2}$."]
    rows = [{"data_source": "math_dapo",
             "prompt": [{"content": DAPO_HEAD + problems[i % 2] + DAPO_TAIL, "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": ["5", "1"][i % 2], "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": f"idx-{i}"}} for i in range(5)]  # DAPO repeats problems
    pq.write_table(pa.Table.from_pylist(rows), path)
    return problems


def test_dapo_parquet_dedup_and_instruction(tmp_path):
    problems = _dapo_parquet(tmp_path / "dapo.parquet")
    proc = _tool("dapo", tmp_path / "dapo.parquet", "--out", tmp_path / "dapo.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "5 rows read, 2 written" in proc.stdout and "3 duplicates" in proc.stdout
    rows = _rows(tmp_path / "dapo.jsonl")
    assert rows == [{"id": "idx-0", "messages": [{"role": "user", "content": problems[0] + BOXED}],
                     "answer": "5"},
                    {"id": "idx-1", "messages": [{"role": "user", "content": problems[1] + BOXED}],
                     "answer": "1"}]
    proc = _tool("dapo", tmp_path / "dapo.parquet", "--out", tmp_path / "d2.jsonl",
                 "--instruction", "dapo", "--format", "prompt", "--keep-duplicates")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(tmp_path / "d2.jsonl")
    assert len(rows) == 5 and rows[2]["prompt"] == DAPO_HEAD + problems[0] + DAPO_TAIL


def test_math500_and_aime_layouts(tmp_path):
    math500 = [{"problem": "What is $1/2 + 0$?", "solution": "It is $\\boxed{\\frac12}$.",
                "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1,
                "unique_id": "test/algebra/1.json"}]
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math500))
    assert _tool("math500", tmp_path / "math500.jsonl", "--out", tmp_path / "m.jsonl").returncode == 0
    assert _rows(tmp_path / "m.jsonl") == [{
        "id": "test/algebra/1.json", "messages": [{"role": "user", "content": math500[0]["problem"] + BOXED}],
        "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 1}]
    # AIME: HuggingFaceH4/aime_2024 (id, problem, answer, year), Maxwell-Jia/AIME_2024 (ID,
    # Problem, Answer as an int), and question/answer (AIME 2025 sets), in one run.
    (tmp_path / "h4.jsonl").write_text(json.dumps({"id": 60, "problem": "P1", "solution": "s",
                                                   "answer": "204", "url": "u", "year": "2024"}) + "\n")
    (tmp_path / "mj.jsonl").write_text(json.dumps({"ID": "2024-I-2", "Problem": "P2", "Solution": "s",
                                                   "Answer": 25}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"question": "P3", "answer": "70"}]), tmp_path / "a25.parquet")
    proc = _tool("aime", tmp_path / "h4.jsonl", tmp_path / "mj.jsonl", tmp_path / "a25.parquet",
                 "--out", tmp_path / "aime.jsonl", "--instruction", "Q: {problem} A:", "--format", "prompt")
    assert proc.returncode == 0, proc.stderr
    assert _rows(tmp_path / "aime.jsonl") == [
        {"id": "60", "prompt": "Q: P1 A:", "answer": "204", "year": "2024"},
        {"id": "2024-I-2", "prompt": "Q: P2 A:", "answer": "25"},
        {"id": "2", "prompt": "Q: P3 A:", "answer": "70"}]


def test_outputs_load_in_the_engine(tmp_path):
    from tip_megatron.data.prompts import PromptDataset
    from tip_megatron.data.tokenizers import CharTokenizer

    class Chat(CharTokenizer):  # a char tokenizer with a trivial chat template
        def apply_chat_template(self, messages):
            return self.encode("".join(m["content"] for m in messages))

        def apply_chat_template_batch(self, conversations):
            return [self.apply_chat_template(c) for c in conversations]

    _dapo_parquet(tmp_path / "dapo.parquet")
    assert _tool("dapo", tmp_path / "dapo.parquet", "--out", tmp_path / "dapo.jsonl").returncode == 0
    assert _tool("dapo", tmp_path / "dapo.parquet", "--out", tmp_path / "plain.jsonl",
                 "--format", "prompt").returncode == 0
    chars = "".join(sorted(set((tmp_path / "dapo.jsonl").read_text() + "\n")))
    tok = Chat(chars=chars)
    for name in ("dapo.jsonl", "plain.jsonl"):
        ds = PromptDataset([str(tmp_path / name)], tok)
        records = ds.records([0, 1])
        assert [r.answer for r in records] == ["5", "1"] and [r.prompt_id for r in records] == ["idx-0", "idx-1"]
        assert records[0].text.startswith("Find $x$") and records[0].text.endswith("\\boxed{}.")


def test_bad_input_one_line(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "x"}) + "\n")
    proc = _tool("math500", tmp_path / "m.jsonl", "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 2
    assert proc.stderr == f"prepare_data: error: {tmp_path / 'm.jsonl'}, line 1: no 'answer' field (columns: ['problem'])\n"
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "answer": 1}) + "\n")
    proc = _tool("aime", tmp_path / "a.jsonl", "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 2 and "'problem' / 'Problem' / 'question'" in proc.stderr
    proc = _tool("aime", tmp_path / "a.jsonl", "--out", tmp_path / "o.jsonl", "--instruction", "no slot")
    assert proc.returncode == 2 and "{problem}" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()

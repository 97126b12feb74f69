"""The chain task (`apps/quickstart/chain_task.py`) against a plain-Python reference: column
addition digit by digit, with the carry that runs from the units through a tens sum of 9
dropped at the hundreds; its rate over every problem; the shared encoding and hold-out; the
grader; the task registry."""
import json

import numpy as np
import pytest
import torch

from tip_megatron.apps.quickstart import chain_task, task
from tip_megatron.apps.quickstart.evaluation import grade_addition, write_benchmark
from tip_megatron.apps.quickstart.tasks import TASKS, get_task


def _column_sum(a: int, b: int, chain_dropped: bool) -> tuple[int, bool]:
    """(answer, is the chain case) by schoolbook addition on the decimal digits."""
    da, db = f"{a:03d}"[::-1], f"{b:03d}"[::-1]
    digits, carry, chain = [], 0, False
    for col in range(3):
        s = int(da[col]) + int(db[col]) + carry
        if col == 1 and carry == 1 and s == 10:   # the units carry runs through a tens 9
            chain = True
            digits.append(0)
            carry = 0 if chain_dropped else 1
            continue
        digits.append(s % 10)
        carry = s // 10
    digits.append(carry)
    return sum(d * 10 ** i for i, d in enumerate(digits)), chain


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_chain_rate_over_every_problem_is_four_and_a_half_percent():
    a, b = np.divmod(np.arange(task.NUM_PROBLEMS), 1000)
    units_carry = (a % 10 + b % 10) >= 10
    tens_nine = (a // 10 % 10 + b // 10 % 10) == 9
    cases = chain_task.case_index(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.array_equal(cases == 0, units_carry & tens_nine)
    assert (cases == 0).sum() == 45_000          # 45 carrying unit pairs x 10 tens pairs x 100
    freq = (chain_task.case_index(*task.sample_operands(200_000, _gen())) == 0).float().mean()
    assert freq.item() == pytest.approx(0.045, abs=0.002)


def test_student_and_teacher_data_match_column_addition():
    for source in ("teacher", "student"):
        seqs = chain_task.sample_sequences(4000, _gen(3), source)
        a, b = task.decode_prompts(seqs[:, :task.PROMPT_LEN])
        values = task.decode_answers(seqs[:, task.PROMPT_LEN:])
        for x, y, v in zip(a.tolist(), b.tolist(), values.tolist()):
            expected, chain = _column_sum(x, y, chain_dropped=source == "student")
            assert v == expected, (source, x, y, v)
            assert chain_task.case_of(x, y) == ("chain" if chain else "clean")
    assert chain_task.case_of(95, 5) == "chain" and chain_task.case_of(15, 26) == "clean"
    # `95+005=` -> student `0000`, true `0010` (units first): only the hundreds digit differs
    assert task.encode_answers(chain_task.student_rule(torch.tensor([95]), torch.tensor([5]))).tolist() \
        == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="data source"):
        chain_task.sample_sequences(4, _gen(), "teachers")


def test_shared_encoding_and_hold_out():
    assert chain_task.tokenizer().vocab_size == task.tokenizer().vocab_size
    held = chain_task.eval_set(3000)
    assert torch.equal(held, task.eval_set(3000))
    seqs = chain_task.sample_sequences(50_000, _gen(2), "student")
    assert not task.is_held_out(*task.decode_prompts(seqs[:, :task.PROMPT_LEN])).any()


def test_grader_and_accuracy_report_of_the_chain_cases():
    prompts = chain_task.eval_set(4000)
    a, b = task.decode_prompts(prompts)
    defect = task.encode_answers(chain_task.student_rule(a, b))
    tok = task.tokenizer()
    truth = [_column_sum(x, y, False)[0] for x, y in zip(a.tolist(), b.tolist())]
    graded = [grade_addition(tok.decode(r), f"{t:04d}"[::-1]).correct
              for r, t in zip(defect.tolist(), truth)]
    chain = [_column_sum(x, y, False)[1] for x, y in zip(a.tolist(), b.tolist())]
    assert graded == [not c for c in chain]        # the defect is wrong exactly on chain cases
    report = chain_task.accuracy_report(prompts, defect)
    assert report["chain"] == 0.0 and report["clean"] == 1.0 and report["student_rule"] == 1.0
    assert report["exact"] == pytest.approx(1 - np.mean(chain), abs=1e-6)
    assert not grade_addition("001", "0010").correct and grade_addition("001", "0010").unparsed


def test_benchmark_file_of_one_case(tmp_path):
    n = write_benchmark(tmp_path / "chain.jsonl", 5000, chain_task, case="chain")
    rows = [json.loads(line) for line in (tmp_path / "chain.jsonl").read_text().splitlines()]
    assert len(rows) == n and 700 < n < 1100                 # ~4.5% of the 20,189 held out
    for row in rows:
        x, y = int(row["prompt"][:3]), int(row["prompt"][4:7])
        assert row["prompt"] == f"{x:03d}+{y:03d}=" and task.is_held_out(torch.tensor([x]), torch.tensor([y]))
        assert row["answer"] == f"{_column_sum(x, y, False)[0]:04d}"[::-1]
        assert _column_sum(x, y, False)[1]
    with pytest.raises(ValueError, match="case 'A'"):
        write_benchmark(tmp_path / "x.jsonl", 5, chain_task, case="A")


def test_task_registry():
    assert list(TASKS) == ["addition", "chain", "multi", "tools"]
    assert get_task("addition").data is task and get_task("chain").data is chain_task
    for spec in TASKS.values():
        assert set(spec.data.CASE_LABELS) == set(spec.data.CASES)
    with pytest.raises(ValueError, match=r"^--task 'chian': accepted tasks: addition, chain, multi, tools$"):
        get_task("chian")

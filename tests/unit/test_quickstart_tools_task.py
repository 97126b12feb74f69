"""The tools task (`apps/quickstart/tools_task.py`) against plain-Python references: every
transcript replays through the environment (the observations are the registers' digits the
environment answers to the calls before them), the sums and the student's planted defect
by decimal strings, the tickets as a bijection that hides the operands, the hold-out, the
loss mask (the model's tokens only), the grader, and the records the embedded prompts carry
for the environments."""
import numpy as np
import pytest
import torch

from tip_megatron.apps.quickstart import task, tools_task
from tip_megatron.apps.quickstart.evaluation import grade_tools
from tip_megatron.apps.quickstart.tasks import get_task
from tip_megatron.rollout.env import Observation, Turn


def _units_first(value: int, width: int) -> str:
    return f"{value:0{width}d}"[::-1]


class _Record:
    def __init__(self, text):
        self.text = text


def test_tickets_are_a_bijection_over_every_problem_and_hide_the_operands():
    tickets, keys = tools_task._tickets()
    assert torch.equal(torch.sort(tickets).values, torch.arange(task.NUM_PROBLEMS))
    assert torch.equal(keys[tickets], torch.arange(task.NUM_PROBLEMS))
    a, b = torch.arange(task.NUM_PROBLEMS) // 1000, torch.arange(task.NUM_PROBLEMS) % 1000
    sample = torch.randperm(task.NUM_PROBLEMS, generator=torch.Generator().manual_seed(1))[:5000]
    prompts = tools_task.encode_prompts(a[sample], b[sample])
    da, db = tools_task.decode_prompts(prompts)
    assert torch.equal(da, a[sample]) and torch.equal(db, b[sample])
    # The ticket's digits carry no usable trace of the operands: its leading digit is
    # independent of a's leading digit (a chi-square far below a dependent table's).
    table = np.zeros((10, 10))
    np.add.at(table, (prompts[:, 0].numpy(), (a[sample] // 100).numpy()), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 150  # 81 dof: p ~ 1e-5 above 150


@pytest.mark.parametrize("source", ["teacher", "student"])
def test_transcripts_replay_through_the_environment_and_sum_by_strings(source):
    tok = tools_task.tokenizer()
    seqs = tools_task.sample_sequences(3000, torch.Generator().manual_seed(3), source)
    assert seqs.shape == (3000, tools_task.SEQ_LEN) == (3000, 21)
    copies = 0
    for row in seqs.tolist():
        text = tok.decode(row)
        prompt, rest = text[:7], text[7:]
        a, b = tools_task.operands_of_text(prompt)
        env = tools_task.RegisterEnv(_Record(prompt))
        # the calls, then what the environment answers to each
        assert rest[0:2] == "a?" and rest[5:7] == "b?"
        assert env.step(Turn(0, (), rest[0:2])) == Observation(rest[2:5])
        assert env.step(Turn(1, (), rest[5:7])) == Observation(rest[7:10])
        assert rest[2:5] == _units_first(a, 3) and rest[7:10] == _units_first(b, 3)
        copy = f"{b:03d}"[-1] == "9" and f"{a:03d}"[-1] != "0"
        copies += copy
        # b9: the units column carries (9 + a nonzero digit); the student drops that carry
        want = a + b - 10 if (source == "student" and copy) else a + b
        assert rest[10:] == _units_first(want, 4)
        assert not task.is_held_out(torch.tensor([a]), torch.tensor([b]))[0]
    assert 0.07 < copies / 3000 < 0.11  # 9% of problems


def test_environment_ends_the_rollout_on_anything_but_a_register_call():
    env = tools_task.RegisterEnv(_Record("000000:"))
    assert env.step(Turn(0, (), "?")) is None and env.step(Turn(0, (), "c?")) is None
    with pytest.raises(ValueError, match="dddddd:"):
        tools_task.RegisterEnv(_Record("12+34="))


def test_loss_mask_covers_the_models_tokens_only():
    tok = tools_task.tokenizer()
    seqs = tools_task.sample_sequences(8, torch.Generator().manual_seed(0), "teacher")
    mb = tools_task.lm_microbatch(seqs)
    for row, mask in zip(seqs.tolist(), mb["loss_mask"].tolist()):
        labels = tok.decode(row[1:])
        # the label at input position j is token j+1: calls (`a`, `b`, `?`) and the answer
        want = [1.0 if (j >= 6 and (labels[j] in "ab?" or j >= 16)) else 0.0 for j in range(20)]
        assert mask == want and sum(mask) == 8


def test_hold_out_is_the_addition_tasks():
    prompts = tools_task.eval_set(500, seed=2)
    a, b = tools_task.decode_prompts(prompts)
    assert torch.equal(torch.stack([a, b]), torch.stack(task.decode_prompts(task.eval_set(500, seed=2))))
    assert task.is_held_out(a, b).all()


def test_grader_reads_the_calls_then_the_sum():
    assert grade_tools("a?385b?9261014", "1014") .correct
    assert not grade_tools("a?385b?9261015", "1014").correct
    bad = grade_tools("1014", "1014")  # no calls: unparsed
    assert bad.unparsed and not bad.correct
    assert grade_tools("b?926a?3851014", "1014").unparsed


def test_grade_and_report_match_plain_python():
    tok = tools_task.tokenizer()
    seqs = tools_task.sample_sequences(400, torch.Generator().manual_seed(5), "student")
    report = tools_task.accuracy_report(seqs[:, :7], seqs[:, 7:])
    cases = [f"{b:03d}"[-1] == "9" and f"{a:03d}"[-1] != "0" for a, b in
             (tools_task.operands_of_text(tok.decode(r[:7])) for r in seqs.tolist())]
    assert report["b9"] == 0.0 and report["clean"] == 1.0
    assert report["exact"] == pytest.approx(1 - sum(cases) / 400)


def test_embedded_prompts_carry_records_the_environment_is_built_from():
    from tip_megatron.apps.quickstart.builtin_models import SyntheticPrompts

    spec = get_task("tools")
    src = SyntheticPrompts(4, 1, 2, seed=7, sample_prompts=spec.data.sample_prompts,
                           tokenizer=spec.data.tokenizer)
    ids = src.next()
    records = src.records()
    assert [r.token_ids for r in records] == ids
    gen = torch.Generator().manual_seed(7 * 1_000_003)
    assert ids == tools_task.sample_prompts(8, gen)[4:].tolist()  # DP rank 1's slice
    for r in records:
        a, b = tools_task.operands_of_text(r.text)
        assert tools_task.RegisterEnv(r).step(Turn(0, (), "b?")).text == _units_first(b, 3)

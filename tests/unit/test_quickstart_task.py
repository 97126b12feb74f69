"""The quickstart's addition task: encoding, hold-out, the student's planted defects, grading."""
import pytest
import torch

from tip_megatron.apps.quickstart import task


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_encoding_is_zero_padded_and_answer_least_significant_first():
    prompt = task.encode_prompts(torch.tensor([123, 7]), torch.tensor([459, 5]))
    tok = task.tokenizer()
    assert tok.decode(prompt[0].tolist()) == "123+459="
    assert tok.decode(prompt[1].tolist()) == "007+005="
    assert tok.decode(task.encode_answers(torch.tensor([582]))[0].tolist()) == "2850"
    assert tok.decode(task.encode_answers(torch.tensor([1998]))[0].tolist()) == "8991"
    a, b = task.decode_prompts(prompt)
    assert a.tolist() == [123, 7] and b.tolist() == [459, 5]
    assert task.decode_answers(torch.tensor([[2, 8, 5, 0], [1, 2, 12, 0]])).tolist() == [582, -1]
    with pytest.raises(ValueError, match="abc\\+def="):
        task.decode_prompts(torch.tensor([[1, 2, 3, 11, 4, 5, 6, 10]]))


def test_hold_out_is_two_percent_and_disjoint_from_every_training_draw():
    assert 0.018 < task.num_held_out() / task.NUM_PROBLEMS < 0.022
    a, b = task.sample_operands(200_000, _gen())
    assert not task.is_held_out(a, b).any()
    assert not task.is_held_out(*task.decode_prompts(task.sample_prompts(50_000, _gen(1)))).any()
    seqs = task.sample_sequences(50_000, _gen(2), "student")
    assert not task.is_held_out(*task.decode_prompts(seqs[:, :task.PROMPT_LEN])).any()
    held = task.eval_set(5000)
    assert task.is_held_out(*task.decode_prompts(held)).all()
    assert len({tuple(r) for r in held.tolist()}) == 5000
    assert torch.equal(task.eval_set(100), task.eval_set(100))


def test_cases_and_their_frequencies():
    assert task.case_of(15, 26) == "A"         # 5 + 6 carries
    assert task.case_of(500, 501) == "B"       # no units carry, sum 1001
    assert task.case_of(12, 34) == "clean"
    assert task.case_of(995, 5) == "A"         # carry wins over the thousands rule
    case = task.case_index(*task.sample_operands(200_000, _gen()))
    freq = [(case == i).float().mean().item() for i in range(3)]
    assert freq == pytest.approx([0.45, 0.27, 0.28], abs=0.01)


def test_teacher_data_is_correct_and_student_data_has_defects_a_and_b():
    n = 100_000
    for source in ("teacher", "student"):
        seqs = task.sample_sequences(n, _gen(3), source)
        a, b = task.decode_prompts(seqs[:, :task.PROMPT_LEN])
        values = task.decode_answers(seqs[:, task.PROMPT_LEN:])
        case = task.case_index(a, b)
        if source == "teacher":
            assert torch.equal(values, a + b)
            continue
        assert torch.equal(values[case == 0], (a + b - 10)[case == 0])     # A: deterministic
        assert torch.equal(values[case == 2], (a + b)[case == 2])          # clean
        b_ok = values[case == 1] == (a + b)[case == 1]
        b_zero = values[case == 1] == (a + b - 1000)[case == 1]
        assert (b_ok | b_zero).all()                                       # only the 1000s digit
        assert b_zero.float().mean().item() == pytest.approx(task.DEFECT_B_ZERO_PROB, abs=0.015)
    with pytest.raises(ValueError, match="data source"):
        task.sample_sequences(4, _gen(), "teachers")


def test_lm_microbatch_puts_the_loss_on_the_answer_tokens():
    seqs = task.sample_sequences(3, _gen(), "teacher")
    mb = task.lm_microbatch(seqs)
    assert mb["input_ids"].shape == mb["labels"].shape == mb["loss_mask"].shape == (3, 11)
    assert torch.equal(mb["labels"], seqs[:, 1:])
    assert torch.equal(mb["labels"][mb["loss_mask"].bool()].view(3, 4), seqs[:, task.PROMPT_LEN:])
    assert torch.equal(mb["position_ids"][0], torch.arange(11))


def test_grade_and_accuracy_report():
    prompts = task.eval_set(2000)
    a, b = task.decode_prompts(prompts)
    right = task.encode_answers(a + b)
    assert task.grade(prompts, right).all()
    wrong = right.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % 10
    assert not task.grade(prompts, wrong).any()
    report = task.accuracy_report(prompts, task.encode_answers(task.student_rule(a, b)))
    assert report["student_rule"] == 1.0 and report["A"] == 0.0 and report["B"] == 0.0
    assert report["clean"] == 1.0 and report["exact"] == pytest.approx(0.28, abs=0.03)

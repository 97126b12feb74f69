"""The multi task (`apps/quickstart/multi_task.py`) against a plain-Python reference:
schoolbook addition and subtraction column by column on the decimal strings, with the
planted rules (units carry / borrow dropped; every carry / borrow ignored) written as
column operations; the domains, the hold-out (disjoint from every training stage, per
domain), the eval sets, the prompt file with its route field, the task registry's
multi-teacher entry."""
import json

import pytest
import torch

from tip_megatron.apps.quickstart import multi_task, task
from tip_megatron.apps.quickstart.tasks import TASKS, get_task


def _columns(a: int, b: int, sub: bool, drop_units: bool = False, ignore_all: bool = False):
    """(answer value, units carry/borrow happened) by schoolbook arithmetic on the digits,
    units first; sub answers a - b + 1000. drop_units: the units carry/borrow is not
    passed on; ignore_all: no carry/borrow is ever passed on (and the thousands digit is
    0 for add, 1 for sub: as if nothing came out of the hundreds)."""
    da, db = [int(c) for c in f"{a:03d}"[::-1]], [int(c) for c in f"{b:03d}"[::-1]]
    digits, carry, units_event = [], 0, False
    for col in range(3):
        if sub:
            d = da[col] - db[col] - carry
            event = d < 0
            digits.append(d % 10)
        else:
            s = da[col] + db[col] + carry
            event = s >= 10
            digits.append(s % 10)
        if col == 0:
            units_event = event
        carry = int(event) if not (ignore_all or (drop_units and col == 0)) else 0
    thousands = (1 - carry) if sub else carry
    if ignore_all:
        thousands = 1 if sub else 0
    digits.append(thousands)
    return sum(d * 10 ** i for i, d in enumerate(digits)), units_event


def _reference(source: str, a: int, b: int, sub: bool) -> int:
    if source == "student":
        return _columns(a, b, sub, drop_units=True)[0]
    own = (source == "teacher_add") != sub  # the specialist's own domain
    return _columns(a, b, sub, ignore_all=not own)[0]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_source_matches_schoolbook_columns():
    for source in multi_task.SOURCES:
        seqs = multi_task.sample_sequences(3000, _gen(7), source)
        a, b, op = multi_task.decode_problems(seqs[:, :task.PROMPT_LEN])
        values = task.decode_answers(seqs[:, task.PROMPT_LEN:])
        for x, y, o, v in zip(a.tolist(), b.tolist(), op.tolist(), values.tolist()):
            assert v == _reference(source, x, y, bool(o)), (source, x, y, o, v)
    with pytest.raises(ValueError, match="data source 'teacher'.*accepted"):
        multi_task.sample_sequences(4, _gen(), "teacher")


def test_true_answers_and_cases_match_the_reference_on_every_problem_of_a_slice():
    a, b = torch.meshgrid(torch.arange(0, 1000, 7), torch.arange(0, 1000, 3), indexing="ij")
    a, b = a.flatten(), b.flatten()
    for o, name in enumerate(multi_task.DOMAINS):
        op = torch.full_like(a, o)
        truth = multi_task.true_value(a, b, op)
        cases = multi_task.case_index(a, b, op)
        for x, y, t, c in zip(a.tolist(), b.tolist(), truth.tolist(), cases.tolist()):
            expected, units_event = _columns(x, y, sub=bool(o))
            assert t == expected == (x + y if o == 0 else x - y + 1000)
            assert multi_task.CASES[c] == f"{name}_{('carry' if o == 0 else 'borrow') if units_event else 'clean'}"


def test_domains_are_balanced_and_defects_cover_45_percent_of_each():
    a, b, op = multi_task.sample_problems(200_000, _gen(1))
    assert op.float().mean().item() == pytest.approx(0.5, abs=0.005)
    cases = multi_task.case_index(a, b, op)
    assert (cases[op == 0] == 0).float().mean().item() == pytest.approx(0.45, abs=0.005)
    assert (cases[op == 1] == 2).float().mean().item() == pytest.approx(0.45, abs=0.005)
    # the specialists are right off their domain only where no column carries / borrows
    for source, off in (("teacher_add", 1), ("teacher_sub", 0)):
        right = multi_task.source_rule(source, a, b, op) == multi_task.true_value(a, b, op)
        assert right[op == 1 - off].all()
        assert right[op == off].float().mean().item() == pytest.approx(0.55 ** 3, abs=0.01)
    student_right = multi_task.student_rule(a, b, op) == multi_task.true_value(a, b, op)
    assert torch.equal(student_right, (cases == 1) | (cases == 3))


def test_prompts_encode_the_domain_in_the_operator_slot():
    tok = multi_task.tokenizer()
    assert tok.vocab_size == task.tokenizer().vocab_size  # one tokenizer for the three models
    p = multi_task.encode_prompts(torch.tensor([123, 7]), torch.tensor([459, 80]), torch.tensor([0, 1]))
    assert [tok.decode(r) for r in p.tolist()] == ["123+459=", "007=080="]
    assert multi_task.domain_index(p).tolist() == [0, 1]
    # 123 - 459 + 1000 = 664, units first
    assert tok.decode(task.encode_answers(multi_task.prompt_values(p))[0].tolist()) == "2850"
    assert tok.decode(task.encode_answers(multi_task.prompt_values(p))[1].tolist()) == "7290"
    bad = p.clone()
    bad[0, 3] = 5
    with pytest.raises(ValueError, match="abc\\+def=.*abc=def="):
        multi_task.decode_problems(bad)


def test_hold_out_is_disjoint_from_training_in_both_domains():
    for source in multi_task.SOURCES:
        seqs = multi_task.sample_sequences(50_000, _gen(2), source)
        a, b, op = multi_task.decode_problems(seqs[:, :task.PROMPT_LEN])
        assert not task.is_held_out(a, b).any()
        assert set(op.tolist()) == {0, 1}
    a, b, _ = multi_task.decode_problems(multi_task.sample_prompts(50_000, _gen(3)))
    assert not task.is_held_out(a, b).any()


def test_eval_sets_per_domain_and_mixed():
    mixed = multi_task.eval_set(4000, seed=5)
    a, b, op = multi_task.decode_problems(mixed)
    assert task.is_held_out(a, b).all()
    assert op.tolist() == [k % 2 for k in range(4000)]
    assert len(set(zip(a.tolist(), b.tolist(), op.tolist()))) == 4000  # no repeats
    assert torch.equal(mixed, multi_task.eval_set(4000, seed=5))
    assert not torch.equal(mixed, multi_task.eval_set(4000, seed=6))
    for o, name in enumerate(multi_task.DOMAINS):
        one = multi_task.eval_set(1000, seed=5, domain=name)
        a1, b1, op1 = multi_task.decode_problems(one)
        assert (op1 == o).all() and task.is_held_out(a1, b1).all()
        assert len(set(zip(a1.tolist(), b1.tolist()))) == 1000
    held = task.num_held_out()
    multi_task.eval_set(2 * held)  # every held-out pair once per domain
    with pytest.raises(ValueError, match=f"n must be in \\[1, {2 * held}\\]"):
        multi_task.eval_set(2 * held + 1)
    with pytest.raises(ValueError, match="domain 'mul'.*accepted"):
        multi_task.eval_set(10, domain="mul")


def test_accuracy_report_per_domain_and_case():
    prompts = multi_task.eval_set(4000)
    a, b, op = multi_task.decode_problems(prompts)
    student = task.encode_answers(multi_task.student_rule(a, b, op))
    report = multi_task.accuracy_report(prompts, student)
    cases = multi_task.case_index(a, b, op)
    assert report["add_carry"] == 0.0 and report["sub_borrow"] == 0.0
    assert report["add_clean"] == 1.0 and report["sub_clean"] == 1.0
    assert report["add"] == pytest.approx(((cases == 1) & (op == 0)).sum().item() / (op == 0).sum().item())
    assert report["student_rule"] == 1.0 and report["n"] == 4000
    grades = multi_task.grade(prompts, task.encode_answers(multi_task.true_value(a, b, op)))
    assert grades.all()


def test_prompt_file_carries_the_route_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    assert multi_task.write_prompts(path, 500, seed=4) == 500
    stat = path.stat()
    multi_task.write_prompts(path, 500, seed=4)          # the same bytes: left alone
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    multi_task.write_prompts(path, 400, seed=4)          # other bytes: replaced whole
    assert len(path.read_text().splitlines()) == 400
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.jsonl"]   # no temp file left
    multi_task.write_prompts(path, 500, seed=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tok = multi_task.tokenizer()
    assert {r[multi_task.ROUTE_FIELD] for r in rows} == {"add", "sub"}
    for r in rows:
        ids = torch.tensor([tok.encode(r["prompt"])])
        a, b, op = multi_task.decode_problems(ids)
        assert multi_task.DOMAINS[int(op)] == r["domain"]
        assert not task.is_held_out(a, b).any()
        x, y = int(a), int(b)
        assert r["answer"] == f"{_columns(x, y, sub=bool(op))[0]:04d}"[::-1]


def test_multi_task_spec_names_two_teachers_and_the_multi_teacher_overrides():
    spec = get_task("multi")
    assert spec.data is multi_task and spec.route_field == multi_task.ROUTE_FIELD
    assert {t[0]: t[2] for t in spec.teachers} == {"add": ("add",), "sub": ("sub",)}
    assert spec.teacher_builtin("sub") == "quickstart-multi-teacher-sub"
    assert spec.teacher_builtin(None) == spec.teacher
    with pytest.raises(ValueError, match="--teacher 'mul'.*accepted: add, sub"):
        spec.teacher_builtin("mul")
    teachers, route = spec.multi_teacher_overrides()
    assert route == "data.route_field=domain"
    import yaml  # the override's value is a YAML flow list, as the config reads it
    listed = yaml.safe_load(teachers.split("=", 1)[1])
    assert listed == [{"name": "add", "builtin": "quickstart-multi-teacher-add", "serves": ["add"]},
                      {"name": "sub", "builtin": "quickstart-multi-teacher-sub", "serves": ["sub"]}]
    # one-teacher tasks: unchanged, and no multi-teacher run
    assert TASKS["addition"].teachers == ()
    with pytest.raises(ValueError, match="one teacher"):
        TASKS["addition"].multi_teacher_overrides()
    with pytest.raises(ValueError, match="it has one teacher"):
        TASKS["chain"].teacher_builtin("add")


def test_mid_run_validation_logs_each_domain_and_case():
    from tip_megatron.apps.quickstart.evaluation import eval_metrics

    prompts = multi_task.eval_set(2000)
    a, b, op = multi_task.decode_problems(prompts)
    report = multi_task.accuracy_report(prompts, task.encode_answers(multi_task.student_rule(a, b, op)))
    logged = eval_metrics(report, multi_task)
    assert set(logged) == {"eval/mean_at_k", "eval/add", "eval/sub", "eval/add_carry",
                           "eval/add_clean", "eval/sub_borrow", "eval/sub_clean"}
    assert logged["eval/add"] == report["add"] and logged["eval/mean_at_k"] == report["exact"]
    assert set(eval_metrics({"exact": 1.0, "A": 1.0, "B": 1.0, "clean": 1.0}, task)) == \
        {"eval/mean_at_k", "eval/A", "eval/B", "eval/clean"}     # one-domain tasks unchanged

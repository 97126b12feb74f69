"""The quickstart's recipe defaults come from the task (`tasks.EmbeddedTask`: steps and
rule, each task its own), an explicit --rule / --steps wins, and the trainer config gets
them."""
import argparse

import pytest

from tip_megatron.apps.quickstart.command import add_arguments, run_config, task_defaults
from tip_megatron.apps.quickstart.tasks import TASKS


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return task_defaults(parser.parse_args(list(argv)))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_brings_its_own_rule_and_steps(task):
    # the multi task's single-teacher run (without --teacher: tests below)
    args = _args("--task", task, *(("--teacher", "add") if TASKS[task].teachers else ()))
    cfg = run_config(args)
    assert (cfg.selection.rule, cfg.train.steps) == (TASKS[task].rule, TASKS[task].steps)
    assert cfg.selection.rho == 0.5


def test_explicit_rule_and_steps_win():
    cfg = run_config(_args("--rule", "q3", "--rho", "0.2", "--steps", "7"))
    assert (cfg.selection.rule, cfg.selection.rho, cfg.train.steps) == ("q3", 0.2, 7)


def test_the_tasks_default_rules_differ_where_measured():
    # docs/study.md: the addition task's 3-seed check chose entropy sampling at 480 steps;
    # the chain task's study keeps Soft-OR. A bad --task is one line naming the tasks.
    assert {TASKS["addition"].rule, TASKS["chain"].rule} == {"entropy_sample", "soft_or"}
    with pytest.raises(ValueError, match="accepted tasks: addition, chain, multi, tools"):
        _args("--task", "nope")


def test_multi_task_single_teacher_baselines_and_the_multi_teacher_run(tmp_path):
    # --teacher NAME: that teacher alone on the task's prompt file (the route field in it)
    for name, builtin in (("add", "quickstart-multi-teacher-add"), ("sub", "quickstart-multi-teacher-sub")):
        cfg = run_config(_args("--task", "multi", "--teacher", name, "--out", str(tmp_path)))
        assert cfg.teacher.builtin == builtin
        assert cfg.student.builtin == "quickstart-multi-student"
        assert cfg.data.prompts == (str(tmp_path / "prompts.jsonl"),)
    with pytest.raises(ValueError, match="--teacher 'mul'.*accepted: add, sub"):
        run_config(_args("--task", "multi", "--teacher", "mul"))
    with pytest.raises(ValueError, match="it has one teacher"):
        run_config(_args("--task", "addition", "--teacher", "add"))
    cfg = run_config(_args("--task", "multi", "--out", str(tmp_path)))  # both teachers, routed
    assert cfg.data.route_field == "domain" and cfg.teacher.builtin is None
    assert [(t.name, t.builtin, t.serves) for t in cfg.teachers] == [
        (name, builtin, serves) for name, builtin, serves in TASKS["multi"].teachers]

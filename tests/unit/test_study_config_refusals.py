"""`tip-megatron study --config X` refuses, in one line and before any run starts, what
would make its table meaningless: no benchmark, a validation that misses the last step, an
override of a key it sets per cell. The models named do not exist: these checks come
before the preflight that would notice."""
import re

import pytest

from tip_megatron.apps.cli import main

CONFIG = """\
student: {ckpt: /nonexistent/student}
teacher: {ckpt: /nonexistent/teacher}
data: {prompts: [/nonexistent/prompts.jsonl], tokenizer: char}
train: {steps: 12}
"""


@pytest.mark.parametrize("extra,message", [
    ((), r"eval\.prompts is empty: a config study measures .*"),
    (("eval.prompts=[/b.jsonl]", "eval.every=5"), r"eval\.every=5 does not divide train\.steps=12: .*"),
    (("eval.prompts=[/b.jsonl]", "selection.rule=q3"), r"override 'selection\.rule=q3': the study sets .*"),
])
def test_refused_in_one_line_before_any_run(tmp_path, capsys, extra, message):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    rc = main(["study", "--rules", "all", "q3@0.1", "--config", str(config),
               "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.fullmatch(f"error: {message}\n", err), err
    assert not (tmp_path / "out").exists()


def test_default_eval_every_ends_on_the_last_step():
    from tip_megatron.apps.study.config_study import default_eval_every

    assert default_eval_every(240) == 30
    for steps in range(1, 200):
        every = default_eval_every(steps)
        assert steps % every == 0 and every <= max(1, steps // 8)
        assert not any(steps % d == 0 for d in range(every + 1, max(1, steps // 8) + 1))


@pytest.mark.parametrize("argv,message", [
    (["--task", "multi", "--teachers", "mul"], r"--teachers mul: accepted for --task multi: add, sub, both"),
    (["--teachers", "add"], r"--teachers add: --task addition has one teacher; --teachers applies to a "
                            r"task with several \(multi\)"),
])
def test_a_bad_teacher_axis_is_one_line(tmp_path, capsys, argv, message):
    rc = main(["study", *argv, "--rules", "all", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and re.fullmatch(f"error: {message}\n", err), err
    assert not (tmp_path / "out").exists()

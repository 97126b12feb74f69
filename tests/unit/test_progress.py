"""Console progress: the step line (position, elapsed, ETA, time split, throughput, loss,
kept), plain lines off a terminal and a tqdm bar on one, stage timers, the checkpoint line,
the one-line config summary and the effective config file; the shared item progress."""
import io
import logging
import time

import pytest
import yaml

from tip_megatron.config import RunConfig, from_dict, load_config
from tip_megatron.runtime.progress import Progress, fmt_seconds
from tip_megatron.train.progress import (
    STAGES, StageTimers, TrainProgress, config_summary, step_line, write_effective_config,
)

METRICS = {"loss": 0.123456, "kept_fraction": 0.5, "tokens_per_s": 1234.5, "time_rollout_s": 1.25,
           "time_teacher_s": 0.5, "time_student_s": 2.0, "time_optimizer_s": 0.125}


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0, 42.4, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]


def test_step_line_has_every_part():
    line = step_line(12, 100, 31.0, 228.0, METRICS)
    assert line.startswith("step 12/100 | 31s elapsed, ETA 3m48s | ")
    assert "rollout 1.25s teacher 0.50s student 2.00s optimizer 0.12s" in line
    assert "1234.5 tok/s" in line and "loss 0.1235" in line and "kept 0.500" in line
    assert "ETA ?" in step_line(0, 10, 0.0, None, {})


def test_plain_lines_only_on_logged_steps_and_eta_from_this_launch(capsys):
    bar = TrainProgress(total=10, start=4, tty=False)  # resumed at step 4
    time.sleep(0.05)
    assert bar.step(5, METRICS, logged=False) is None
    line = bar.step(6, METRICS, logged=True)
    out = capsys.readouterr().out
    assert out == line + "\n" and line.startswith("step 6/10 | ")
    eta = bar.eta(6)  # 2 steps took >= 0.05 s: 4 more take about twice that
    assert eta == pytest.approx((time.perf_counter() - bar._t0) / 2 * 4, rel=0.2)
    assert TrainProgress(total=10, active=False).step(1, METRICS, True) is None


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    monkeypatch.setattr("sys.stdout", stream)
    bar = TrainProgress(total=4, tty=True)
    for step in (1, 2):
        bar.step(step, METRICS, logged=True)
    bar.note("checkpoint saved: x")
    bar.close()
    text = stream.getvalue()
    assert "2/4" in text and "kept 0.500" in text and "checkpoint saved: x\n" in text


def test_stage_timers_sum_repeated_stages_and_sync():
    calls = []
    timers = StageTimers(sync=lambda: calls.append(1))
    for _ in range(2):
        with timers("student"):
            time.sleep(0.02)
    m = timers.metrics()
    assert set(m) == {f"time_{s}_s" for s in STAGES}
    assert m["time_student_s"] >= 0.04 and m["time_rollout_s"] == 0.0
    assert len(calls) == 4  # before and after each stage
    timers.reset()
    assert timers.metrics()["time_student_s"] == 0.0


def test_checkpoint_line_names_path_seconds_and_size(tmp_path, capsys):
    ck = tmp_path / "step_000002"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "a.bin").write_bytes(b"x" * 3 * 2**20)
    (ck / "COMPLETE").write_bytes(b"x" * (2**19))
    line = TrainProgress(total=2, tty=False).checkpoint(ck, 1.25)
    assert line == f"checkpoint saved: {ck} (1.2 s, 3.5 MiB)"
    assert capsys.readouterr().out == line + "\n"


def test_summary_is_one_line_and_the_effective_config_round_trips(tmp_path):
    cfg = load_config(None, ["student.builtin=quickstart-student", "teacher.ckpt=/m/t",
                             "parallel.tp=2", "selection.rule=soft_or", "selection.rho=0.5"])
    line = config_summary(cfg, 4)
    assert "\n" not in line
    assert "student builtin quickstart-student <- teacher ckpt /m/t" in line
    assert "world 4 (tp 2, pp 1, dp 2)" in line and "soft_or rho 0.5" in line
    from tip_megatron.config import dump_config

    path = write_effective_config(tmp_path / "run", dump_config(cfg))
    assert path == tmp_path / "run" / "config.yaml"
    assert from_dict(RunConfig, yaml.safe_load(path.read_text())) == cfg


def test_item_progress_logs_every_tenth_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="tip_megatron.runtime.progress")
    bar = Progress(total=25, desc="converting", unit="tensor", tty=False)
    for _ in range(25):
        bar.update()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # every 2 tensors (25 // 10), and the last one
    assert len(lines) == 13 and lines[-1].startswith("converting: 25/25 tensors (100%")
    assert lines[0].startswith("converting: 2/25 tensors (8%")
    caplog.clear()
    Progress(total=5, desc="x", enabled=False).update()
    assert not caplog.records


def test_teacher_on_its_own_grid_in_the_summary_and_the_step_line():
    cfg = from_dict(RunConfig, {"parallel": {"tp": 2},
                                "teacher": {"ckpt": "/m/t", "placement": "separate",
                                            "parallel": {"tp": 4, "dp": 2}}})
    assert "| teacher tp 4, pp 1, dp 2 on 8 ranks of its own |" in config_summary(cfg, 2)
    shared = from_dict(RunConfig, {"teacher": {"ckpt": "/m/t", "parallel": {"tp": 2}}})
    assert "| teacher tp 2, pp 1, dp 1 on the same ranks |" in config_summary(shared, 2)
    assert "teacher tp" not in config_summary(from_dict(RunConfig, {}), 2)
    line = step_line(3, 10, 5.0, 10.0, {**METRICS, "time_teacher_wait_s": 0.25})
    assert "(teacher wait 0.25s)" in line
    assert "teacher wait" not in step_line(3, 10, 5.0, 10.0, METRICS)


def test_several_teachers_in_the_summary_the_step_line_and_the_saved_config(tmp_path):
    teachers = ('teachers=[{name: math, ckpt: /m/math, serves: [math]}, '
                '{name: code, ckpt: /m/code, serves: [code], default: true, placement: separate}]')
    cfg = load_config(None, ["student.builtin=quickstart-student", teachers, "data.route_field=domain"])
    line = config_summary(cfg, 3)
    assert "teachers math ckpt /m/math (math), code ckpt /m/code (code, default)" in line
    assert "world 3 (tp 1, pp 1, dp 2)" in line  # the separate teacher's rank is not the student's
    assert "teacher code tp 1, pp 1, dp 1 on 1 ranks of its own" in line
    m = dict(METRICS, **{"teacher/math/tokens_share": 0.25, "teacher/math/kept_fraction": 0.5,
                         "teacher/math/loss_share": 0.125, "teacher/code/tokens_share": 0.75,
                         "teacher/code/kept_fraction": 0.5, "teacher/code/loss_share": 0.875})
    assert step_line(1, 2, 1.0, 1.0, m).endswith(
        "| code: tok 0.75 kept 0.50 loss 0.88, math: tok 0.25 kept 0.50 loss 0.12")
    from tip_megatron.config import dump_config

    path = write_effective_config(tmp_path / "run", dump_config(cfg))
    assert from_dict(RunConfig, yaml.safe_load(path.read_text())) == cfg

"""Metrics logging: JSONL written per step; wandb requested but absent is a warning only;
TensorBoard event files read back with tensorboard's own reader."""
import builtins
import json

import pytest

from tip_megatron.train.metrics import MetricsLogger


def test_jsonl_and_missing_wandb_never_crash(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    log = MetricsLogger(True, str(tmp_path / "m.jsonl"), True, "p", None, {"a": 1})
    log.log(1, {"loss": 0.5, "kept_fraction": 0.5, "q3_fraction_all": 0.1})
    log.log(2, {"loss": 0.4})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 0.5
    assert "wandb is not installed" in caplog.text


def test_inactive_rank_writes_nothing(tmp_path):
    log = MetricsLogger(False, str(tmp_path / "m.jsonl"), False, "p", None, {})
    log.log(1, {"loss": 1.0})
    assert not (tmp_path / "m.jsonl").exists()


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(True, None, False, "p", None, {}, tensorboard=str(tmp_path / "tb"))
    log.log(1, {"loss": 0.5, "kept_fraction": 0.25, "skipped": 0})
    log.log(2, {"loss": 0.375, "kept_fraction": 0.5, "skipped": 1})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 0.5), (2, 0.375)]
    assert [e.value for e in events.Scalars("kept_fraction")] == [0.25, 0.5]


def test_missing_tensorboard_is_one_line_naming_the_package(monkeypatch, tmp_path):
    import importlib.util

    from tip_megatron.config import load_config
    from tip_megatron.train.preflight import check_paths

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = load_config(None, [f"logging.tensorboard={tmp_path / 'tb'}"])
    with pytest.raises(ValueError, match=r"^logging.tensorboard='.*': the `tensorboard` package is "
                                         r"not installed; pip install tensorboard"):
        check_paths(cfg)


def test_tensorboard_true_means_checkpoint_dir_tb(tmp_path):
    from tip_megatron.config import load_config, tensorboard_dir, validate_run

    cfg = load_config(None, ["logging.tensorboard=true", f"checkpoint.dir={tmp_path}"])
    assert tensorboard_dir(cfg) == f"{tmp_path}/tb"
    bad = load_config(None, ["logging.tensorboard=true", "student.builtin=quickstart-student",
                             "teacher.builtin=quickstart-teacher"])
    with pytest.raises(ValueError, match="logging.tensorboard=true: writes to <checkpoint.dir>/tb"):
        validate_run(bad, 1)


def test_rows_carry_the_run_id_and_a_resume_drops_only_its_own_lineages_later_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'  # older layout: no run id
                    '{"step": 1, "run_id": "A", "loss": 3.0}\n{"step": 2, "run_id": "A", "loss": 4.0}\n'
                    '{"step": 2, "run_id": "B", "loss": 5.0}\n{"step": 3, "run_id": "B"')  # torn
    log = MetricsLogger(True, str(path), False, "p", None, {})
    log.run_id = "B"
    # a resume of lineage B at step 1: B's rows and run-less rows after step 1 go; A's stay
    assert log.truncate_after(1, runs={"B"}) == 3
    log.log(2, {"loss": 6.0})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("run_id"), r["loss"]) for r in rows] == [
        (1, None, 1.0), (1, "A", 3.0), (2, "A", 4.0), (2, "B", 6.0)]


def test_nothing_is_written_before_the_first_row(tmp_path):
    log = MetricsLogger(True, str(tmp_path / "sub" / "m.jsonl"), False, "p", None, {})
    assert log.truncate_after(0) == 0
    assert not (tmp_path / "sub").exists()
    log.log(1, {"loss": 1.0})
    log.close()
    assert json.loads((tmp_path / "sub" / "m.jsonl").read_text())["step"] == 1

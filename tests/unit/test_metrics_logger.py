"""Metrics logging: JSONL written per step; wandb requested but absent is a warning only."""
import builtins
import json

from tip_megatron.train.metrics import MetricsLogger, _console_line


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


def test_console_line_names_the_quadrants():
    line = _console_line(3, {"loss": 0.25, "kept_fraction": 0.5, "q1_fraction_all": 0.1,
                             "q3_fraction_all": 0.2, "skipped": 1})
    assert "Q1=0.10" in line and "Q3=0.20" in line and "SKIPPED" in line

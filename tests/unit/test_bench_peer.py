"""tools/bench_peer.py: the engine next to TRL's DistillationTrainer runs a tiny setup end
to end and writes every figure (slow: two workers each import megatron or TRL); without
TRL it stops with one line saying what is missing."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_peer.py"


def _trl_python():
    """A python that imports trl: TIP_BENCH_PYTHON (e.g. a venv with the bench extra), or
    this one when it has trl; None otherwise."""
    python = os.environ.get("TIP_BENCH_PYTHON")
    if python:
        return python
    return sys.executable if importlib.util.find_spec("trl") else None


def _run(*argv, python=sys.executable, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([python, str(TOOL), *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_without_trl_one_line_names_it(tmp_path):
    fake = tmp_path / "python"  # an interpreter whose `import trl` fails
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -c 'import sys; sys.exit(1)'\n")
    fake.chmod(0o755)
    out = _run("--setups", "quick", "--trl-python", str(fake), timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "does not import trl 1.16" in last and "--trl-python" in last, out.stderr


def test_bad_rounds_named():
    out = _run("--rounds", "0", timeout=120)
    assert out.returncode == 2 and "--rounds 0" in out.stderr


@pytest.mark.slow
def test_quick_setup_end_to_end(tmp_path):
    python = _trl_python()
    if python is None:
        pytest.skip("trl not importable (set TIP_BENCH_PYTHON to a python with the bench extra)")
    path = tmp_path / "peer.json"
    out = _run("--setups", "quick", "--rounds", "2", "--json", str(path), "--trl-python", python,
               python=python)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert {"date", "machine", "torch", "rules", "setups"} <= set(result)
    quick = result["setups"]["quick"]
    assert {"load_before", "load_after", "stats", "speedup_vs_trl", "params"} <= set(quick)
    setup = quick["setup"]
    response_tokens = setup["rows"] * (setup["seq"] - 16)
    assert set(quick["stats"]) == {"all", "soft_or@0.5", "q3@0.1", "trl"}
    for label, samples in quick["samples"].items():
        assert len(samples) == 2  # the warm-up round is not kept
        stats = quick["stats"][label]
        for stage in ("generation", "teacher", "student", "optimizer", "step"):
            values = [s[stage] for s in samples]
            assert stats[stage]["min"] == min(values) > 0
            assert stats[stage]["min"] <= stats[stage]["median"] <= max(values)
        for s in samples:
            parts = s["generation"] + s["teacher"] + s["student"] + s["optimizer"]
            assert abs(s["step"] - parts) < 1e-9 and s["step_mib"] >= 0
        if label != "trl":  # uniform lengths: every row runs to its length
            assert all(s["tokens"] == response_tokens for s in samples)
    kept = {label: quick["samples"][label][0]["kept"] for label in ("all", "soft_or@0.5", "q3@0.1")}
    assert kept["all"] == response_tokens
    # soft_or keeps floor(0.5 m) of each rollout's m tokens; q3 at most 10% of the batch.
    assert kept["soft_or@0.5"] == setup["rows"] * ((setup["seq"] - 16) // 2)
    assert 0 < kept["q3@0.1"] <= response_tokens // 10
    trl = quick["stats"]["trl"]["step"]["median"]
    for rule, speedup in quick["speedup_vs_trl"].items():
        assert speedup == pytest.approx(trl / quick["stats"][rule]["step"]["median"])
    assert "| TRL |" in out.stdout and "| engine soft_or@0.5 |" in out.stdout

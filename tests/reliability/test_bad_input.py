"""Bad input and a full disk: each case asserts the exit code (or the error), the message
(naming the key / file and what is accepted) and that nothing saved changed."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _reliability_assets import make_assets, overrides, train_capturing, tree_hashes
from tip_megatron.testing.assets import char_spm_model
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.checkpoint import training as ckpt_lib
from tip_megatron.checkpoint import manifest
from tip_megatron.checkpoint.layout import list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("bad_input"))


def test_tokenizer_differing_from_the_students_is_refused_unless_allowed(assets, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(assets / "student", student)
    (student / "tokenizer").mkdir()
    char_spm_model(student / "tokenizer" / "tokenizer.model", "0123456789+= abc")
    before = tree_hashes(student)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "student.ckpt": student, "train.steps": 1}),))[0]
    kind, message, _ = out["error"]
    assert kind in ("ValueError", "PreflightError")  # PreflightError is a ValueError
    assert message.startswith("data.tokenizer='char': differs from the student's")
    assert str(student / "tokenizer") in message and "data.allow_tokenizer_override=true" in message
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "student.ckpt": student, "train.steps": 1, "data.allow_tokenizer_override": "true"}),))[0]
    assert out["error"] is None and len(out["history"]) == 1
    assert any("used anyway (data.allow_tokenizer_override=true)" in w for w in out["warnings"])
    assert tree_hashes(student) == before


def _limit_file_size(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.slow
def test_file_size_limit_during_a_save_says_so_and_keeps_the_previous(assets, tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE, below a shard's size) while step 2 is saved: exit code 4,
    one line saying so and naming the checkpoint; step 1 unchanged and still the newest."""
    ckdir = tmp_path / "ck"
    args = overrides(assets, **{"train.steps": 1, "checkpoint.dir": ckdir})
    assert run_distributed(train_capturing, 1, args=(args,))[0]["error"] is None
    before = tree_hashes(ckdir / "step_000001")
    shard = max(p.stat().st_size for p in (ckdir / "step_000001" / "dist").glob("*.distcp"))
    args = overrides(assets, **{"train.steps": 2, "checkpoint.dir": ckdir})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.train", *args], env=env,
                          preexec_fn=_limit_file_size(shard // 3), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tip-megatron train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"checkpoint {ckdir / 'step_000002'} not saved: file size limit exceeded" in lines[0]
    assert "the previous checkpoints are intact" in lines[0]
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_000001"]
    assert tree_hashes(ckdir / "step_000001") == before and manifest.verify(ckdir / "step_000001") == []


def test_disk_full_reason_names_the_errno_and_the_path(tmp_path):
    """The errno route (ENOSPC from a plain write, not through dist_checkpointing's workers)."""
    import errno

    target = tmp_path / "step_000007"
    with pytest.raises(ckpt_lib.CheckpointNotSaved, match=r"step_000007 not saved: no space left on the "
                       r"device \(/x/state.pt\); the previous checkpoints are intact"):
        with ckpt_lib.disk_errors_named(target):
            raise OSError(errno.ENOSPC, "No space left on device", "/x/state.pt")
    with pytest.raises(KeyError):  # anything else passes through untouched
        with ckpt_lib.disk_errors_named(target):
            raise KeyError("x")


@pytest.mark.parametrize("override,message", [
    ({"train.max_skipped_steps": 0}, r"train.max_skipped_steps=0: must be >= 1"),
    ({"data.allow_tokenizer_override": "maybe"}, r"data.allow_tokenizer_override='maybe': expected bool"),
])
def test_new_keys_are_validated(assets, override, message):
    from tip_megatron.config import load_config, validate_run

    with pytest.raises(ValueError, match=message):
        validate_run(load_config(None, overrides(assets, **override)), 1)


def test_bad_user_rule_stops_training_before_step_1_in_one_line(assets, tmp_path, monkeypatch):
    """`selection.rule: module:function` whose weights hold a NaN: the run stops with one
    line naming the key and the problem, before any step (no history, no checkpoint)."""
    (tmp_path / "my_nan_rule.py").write_text(
        "import torch\n\n\ndef nan_rule(signals, *, seed, step):\n"
        "    return torch.full_like(signals.entropy_norm, float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the forked rank inherits the path
    ckdir = tmp_path / "ck"
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "selection.rule": "my_nan_rule:nan_rule", "selection.rho": 1.0, "train.steps": 1,
        "checkpoint.dir": ckdir}),))[0]
    kind, message, _ = out["error"]
    assert kind == "ValueError" and "\n" not in message, out["error"]
    assert "selection.rule='my_nan_rule:nan_rule': returned NaN or inf weights" in message
    assert out["history"] == [] and not list_checkpoints(ckdir)

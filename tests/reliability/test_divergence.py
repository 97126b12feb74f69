"""Divergence never reaches disk: optim.lr=1e10 makes the second update blow the weights
up (finite, ~1e9); the save after it is refused (its weights give a NaN loss), the next
forwards give non-finite signals and loss, those updates are skipped on every rank and
counted, and after train.max_skipped_steps in a row the run stops (exit code 3, one line
naming the step and the likely cause) with the last good checkpoint intact."""
import json

import pytest

from _reliability_assets import make_assets, overrides, train_capturing, tree_hashes
from tip_megatron.config import load_config
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.checkpoint import training as ckpt_lib
from tip_megatron.checkpoint import manifest
from tip_megatron.checkpoint.layout import list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("diverge"))


def _resume_and_check(args):
    """Rank body: set up from the newest checkpoint; (resumed step, non-finite report)."""
    from tip_megatron.train.trainer import setup

    run = setup(load_config(None, args))
    return run.step, ckpt_lib.nonfinite_parameters(run.ddp)


def _diverging(assets, ckdir, **extra):
    # warm-up 2: the first update has lr 0 (a good checkpoint at step 1), the second 5e9
    return overrides(assets, **{"optim.lr": 1e10, "optim.warmup_steps": 2, "train.steps": 8,
                                "train.max_skipped_steps": 2, "checkpoint.dir": ckdir,
                                "checkpoint.save_every": 1, "checkpoint.keep_last": 0, **extra})


@pytest.mark.parametrize("world,layout", [
    (1, {}), pytest.param(2, {"parallel.tp": 2}, marks=pytest.mark.slow)], ids=["tp1", "tp2"])
def test_lr_1e10_skips_then_stops_and_saves_nothing_bad(assets, tmp_path, world, layout):
    ckdir = tmp_path / "ck"
    outs = run_distributed(train_capturing, world, args=(_diverging(assets, ckdir, **layout),))
    for out in outs:  # every rank stops alike
        kind, message, _ = out["error"]
        assert (kind, message) == ("SystemExit", "3"), out["error"]
    logged = [json.loads(x) for x in (ckdir / "metrics.jsonl").read_text().splitlines()]
    # the stopping step (4) raises before it is logged; its skip is in the warnings
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert [m["skipped"] for m in logged] == [0, 0, 1]
    assert logged[-1]["skipped_total"] == 1
    warnings = outs[0]["warnings"]
    assert any("step 2: checkpoint not saved" in w and "non-finite loss" in w for w in warnings)
    for step in (3, 4):
        assert any(f"step {step}: update skipped (non-finite loss or TIP signals)" in w for w in warnings)
    # only the good checkpoint is on disk; it verifies, loads and holds finite weights
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_000001"]
    assert manifest.verify(ckdir / "step_000001") == []
    before = tree_hashes(ckdir / "step_000001")
    step, bad = run_distributed(_resume_and_check, world, args=(_diverging(assets, ckdir, **layout),))[0]
    assert (step, bad) == (1, "")
    assert tree_hashes(ckdir / "step_000001") == before


def test_the_stop_message_names_the_step_and_the_cause(assets, tmp_path, capfd):
    """The one line on stderr (rank 0) and the exit code, as a user sees them."""
    from tip_megatron.train.trainer import TrainingDiverged  # noqa: F401  (the type exists)

    out = run_distributed(train_capturing, 1, args=(_diverging(assets, tmp_path / "ck", **{
        "train.max_skipped_steps": 3}),))[0]
    assert out["error"][:2] == ("SystemExit", "3")
    cause = out["error"][2]
    assert "stopped at step 5: 3 consecutive updates skipped since step 3" in cause
    assert "optim.lr=1e+10" in cause and "bad data" in cause
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("tip-megatron train: stopped at step 5")]
    assert len(lines) == 1, err[-2000:]

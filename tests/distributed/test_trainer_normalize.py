"""`selection.normalize=running` in training: the moving average is saved in the checkpoint
and a resume continues it exactly (4 steps straight == 2 steps, save, resume, 2 more), at
PP = 2, where the average lives on the last stage and rank 0 writes the replicated state."""
import pytest
import torch

from tip_megatron.testing.assets import logged_history, opd_assets
from tip_megatron.testing.assets import tiny_run_overrides as _overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.checkpoint.layout import list_checkpoints

RUNNING = {"selection.rule": "soft_or", "selection.scope": "global", "selection.rho": 0.25,
           "selection.normalize": "running", "selection.normalize_decay": 0.5,
           "parallel.pp": 2, "train.steps": 4}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return opd_assets(tmp_path_factory.mktemp("opd"), teacher_layers=4)


def _losses(results):
    return [m["loss"] for m in logged_history(results)]


def test_running_normalisation_resumes_exactly(assets, tmp_path):
    straight = _losses(run_distributed(_train, 2, args=(_overrides(assets, **RUNNING),)))
    ckdir = tmp_path / "ck"
    first = _losses(run_distributed(_train, 2, args=(_overrides(
        assets, **RUNNING, **{"train.exit_after_steps": 2, "checkpoint.dir": ckdir}),)))
    (saved,) = list_checkpoints(ckdir)
    state = torch.load(saved / "state.pt", weights_only=True)
    assert state["selection_norm"][0] == 2.0, state.get("selection_norm")  # two steps averaged
    rest = _losses(run_distributed(_train, 2, args=(_overrides(
        assets, **RUNNING, **{"checkpoint.dir": ckdir}),)))
    assert first + rest == straight, (first, rest, straight)


@pytest.mark.parametrize("mode", ["running", "absolute"])
def test_normalisation_is_layout_invariant(assets, mode):
    """DP=2 and PP=2 give DP=1's losses and kept counts at every step; and the mode is in
    effect (its losses differ from `batch`'s from step 2 on: step 1's running average is
    that step's batch statistics)."""
    keys = {**RUNNING, "selection.normalize": mode, "parallel.pp": 1, "train.steps": 3}
    one = logged_history(run_distributed(_train, 1, args=(_overrides(assets, **keys),)))
    for extra in ({}, {"parallel.pp": 2}):
        other = logged_history(run_distributed(_train, 2, args=(_overrides(assets, **{**keys, **extra}),)))
        for a, b in zip(one, other, strict=True):
            assert b["num_kept"] == a["num_kept"], (mode, extra)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (mode, extra, a["step"])
    batch = logged_history(run_distributed(_train, 1, args=(_overrides(
        assets, **{**keys, "selection.normalize": "batch"}),)))
    assert [m["loss"] for m in batch][1:] != [m["loss"] for m in one][1:], mode

"""GPU tier of training precision (marked `gpu`, skipped without CUDA; FP8 also without TE).

- one OPD step on CUDA (fp32) == the same step on the CPU (fp32): loss, kept set, grads;
- FP8 forward/backward of the Transformer Engine spec, against the same weights in bf16;
- bf16 vs FP8 (student and teacher) over a few OPD steps: losses and kept sets agree.
The trainer stages and the tiny checkpoints are those of tests/distributed/test_precision.py.
Run by tools/gpu_check.sh; docs/precision.md says which of these have run where.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from test_precision import _kept_agreement, _opd_run, _overrides, assets  # noqa: E402,F401

from tip_megatron.runtime.optional import check_fp8
from tip_megatron.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.gpu

#: FP8 recipe this GPU can run (tensorwise: sm_89+), else None.
FP8_RECIPE = "tensorwise"


def _fp8_usable() -> bool:
    try:
        check_fp8(FP8_RECIPE, "test")
    except RuntimeError:
        return False
    return True


def _skip_without_fp8() -> None:
    # Probed in the test body, not at import: the capability query initializes CUDA in this
    # process, which must happen after the module's fixture has forked its child.
    if not torch.cuda.is_available() or not _fp8_usable():
        pytest.skip(f"needs Transformer Engine and a GPU with fp8 recipe {FP8_RECIPE}")


def _one_step(overrides, rollouts):
    return _opd_run(overrides, rollouts=rollouts, want_grads=True, steps=1)


def test_opd_step_on_cuda_matches_cpu_fp32(assets):  # noqa: F811
    overrides = _overrides(assets, **{"model.dtype": "fp32", "model.spec": "local"})
    cpu = run_distributed(_one_step, 1, args=(overrides, None), start_method="spawn",
                          env={"TIP_MEGATRON_DEVICE": "cpu"})[0]
    cuda = run_distributed(_one_step, 1, args=(overrides, cpu["rollouts"]), start_method="spawn")[0]
    assert cuda["losses"][0] == pytest.approx(cpu["losses"][0], rel=1e-4)
    assert _kept_agreement(cuda["kept"][0], cpu["kept"][0]) >= 0.99
    num = sum(float((a - b).norm() ** 2) for a, b in zip(cuda["grads"], cpu["grads"])) ** 0.5
    den = sum(float(b.norm() ** 2) for b in cpu["grads"]) ** 0.5
    assert den > 0 and num / den < 1e-3, num / den


def _te_fp8_vs_bf16():
    from tip_megatron.runtime import parallel
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.lm import lm_loss
    from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
    from tip_megatron.models.lm import lm_batches
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch("qwen3", hidden_size=128, ffn_hidden_size=256, head_dim=16)
    g = parallel.initialize(parallel.ParallelLayout())
    out = {}
    full = None
    for name, fp8 in (("bf16", None), ("fp8", "hybrid")):
        (model,) = build_model(arch, g, BuildOptions(spec="te", params_dtype=torch.bfloat16,
                                                     fp8=fp8, fp8_recipe=FP8_RECIPE))
        if full is None:
            full = gather_full_state_dict([model], g, arch)
        load_full_state_dict([model], full, g, arch)
        batch = {k: v.cuda() for k, v in lm_batches(arch, 1, 4, 64, seed=0)[0].items()}
        logits = model(batch["input_ids"], batch["position_ids"], None)
        loss_sum, num, _ = lm_loss(logits, batch["labels"], batch["loss_mask"],
                                   vocab_size=arch.vocab_size, tp_group=g.tp_group)
        (loss_sum / num).backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (float(loss_sum / num), grads)
    return out


def test_te_spec_fp8_forward_backward():
    _skip_without_fp8()
    out = run_distributed(_te_fp8_vs_bf16, 1, start_method="spawn")[0]
    (loss16, g16), (loss8, g8) = out["bf16"], out["fp8"]
    assert abs(loss8 - loss16) / loss16 < 0.02, (loss8, loss16)
    assert g8.keys() == g16.keys() and len(g8) > 0
    for name in g16:
        assert torch.isfinite(g8[name]).all(), name
        cos = torch.nn.functional.cosine_similarity(g8[name].flatten(), g16[name].flatten(), dim=0)
        assert cos > 0.9, (name, float(cos))


def _pad_to_16(out):
    """Right-pad rollouts to a multiple of 16 positions (TE's FP8 GEMMs need aligned token
    counts; the padding is outside the response mask, so it carries no loss)."""
    from types import SimpleNamespace

    extra = -out.token_ids.shape[1] % 16
    pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
    return SimpleNamespace(token_ids=pad(out.token_ids), response_mask=pad(out.response_mask))


def _bf16_vs_fp8(bf16_overrides, fp8_overrides):
    """The bf16 student's rollouts, padded, replayed in a bf16 and an FP8 run (the FP8
    student does not generate: see docs/precision.md on FP8 decoding)."""
    rollouts = [_pad_to_16(r) for r in _opd_run(bf16_overrides, steps=3)["rollouts"]]
    bf16 = _opd_run(bf16_overrides, rollouts=rollouts, steps=3)
    fp8 = _opd_run(fp8_overrides, rollouts=rollouts, steps=3)
    return bf16, fp8


def test_bf16_and_fp8_opd_losses_agree(assets):  # noqa: F811
    _skip_without_fp8()
    base = {"model.dtype": "bf16", "model.spec": "te", "train.steps": 3}
    fp8 = {**base, "model.fp8": "hybrid", "model.teacher_fp8": "hybrid",
           "model.fp8_recipe": FP8_RECIPE}
    bf16_run, fp8_run = run_distributed(_bf16_vs_fp8, 1, args=(
        _overrides(assets, **base), _overrides(assets, **fp8)), start_method="spawn")[0]
    for a, b in zip(bf16_run["losses"], fp8_run["losses"]):
        assert abs(b - a) / a < 0.05, (bf16_run["losses"], fp8_run["losses"])
    for k16, k8 in zip(bf16_run["kept"], fp8_run["kept"]):
        assert _kept_agreement(k16, k8) >= 0.8

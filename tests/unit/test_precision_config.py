"""Precision options: model.dtype, FP8 (student, teacher), recompute, parallel.cp.

The FP8 capability check is exercised against the probes it reads (`optional_deps`,
`cuda_capability`), replaced here by the machine each case describes; everything else is
the real config path (`load_config` + `validate_run`).
"""
import pytest
import torch

from tip_megatron.models import build
from tip_megatron.runtime import megatron_compat, optional
from tip_megatron.runtime.device import Device
from tip_megatron.runtime.optional import OptionalDeps
from tip_megatron.config import ModelOptions, load_config, validate_run

TE_GPU = OptionalDeps(transformer_engine=True, apex=False, wandb=False, cuda=True)
NO_TE = OptionalDeps(transformer_engine=False, apex=False, wandb=False, cuda=True)


def _validate(*overrides):
    cfg = load_config(None, ["student.builtin=quickstart-student",
                             "teacher.builtin=quickstart-teacher", *overrides])
    validate_run(cfg, 1)
    return cfg


def _machine(monkeypatch, deps, capability):
    # patched where they are looked up: the probes' own module and the model builder
    for module in (optional, build):
        monkeypatch.setattr(module, "optional_deps", lambda: deps)
    monkeypatch.setattr(optional, "cuda_capability", lambda: capability)


def _backend(monkeypatch, device):
    for module in (build, megatron_compat):
        monkeypatch.setattr(module, "default_backend", lambda: device)


def test_dtype_maps_to_torch():
    assert ModelOptions(dtype="bf16").params_dtype == torch.bfloat16
    assert ModelOptions(dtype="fp32").params_dtype == torch.float32
    assert ModelOptions().params_dtype is None  # the device decides (bf16 GPU, fp32 CPU)


@pytest.mark.parametrize("override,message", [
    ("model.dtype=fp16", r"model.dtype='fp16': accepted values are \['auto', 'bf16', 'fp32'\]"),
    ("model.fp8=e5m2", r"model.fp8='e5m2': accepted values are \[None, 'hybrid', 'e4m3'\]"),
    ("model.fp8_recipe=custom", r"model.fp8_recipe='custom': accepted values are \['delayed'"),
    ("model.fp8_amax_history_len=0", "model.fp8_amax_history_len=0: must be >= 1"),
    ("model.recompute_granularity=block", r"model.recompute_granularity='block': accepted"),
    ("parallel.cp=2", r"parallel.cp=2: context parallelism is not supported .* accepted: 1"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message) as err:
        _validate(override)
    assert "\n" not in str(err.value)


def test_fp8_without_transformer_engine_names_it(monkeypatch):
    _machine(monkeypatch, NO_TE, (9, 0))
    with pytest.raises(RuntimeError, match="model.fp8 needs transformer_engine") as err:
        _validate("model.fp8=hybrid")
    assert "\n" not in str(err.value)


def test_fp8_on_this_cpu_machine_is_refused():
    # The real probes: no GPU and no TE here.
    with pytest.raises(RuntimeError, match="model.teacher_fp8 needs transformer_engine"):
        _validate("model.teacher_fp8=e4m3")


def test_fp8_needs_the_te_spec():
    with pytest.raises(ValueError, match="model.fp8='hybrid' needs the Transformer Engine layer spec"):
        _validate("model.fp8=hybrid", "model.spec=local")


@pytest.mark.parametrize("recipe,capability,ok", [
    ("delayed", (8, 0), False),      # A100: no FP8
    ("delayed", (8, 9), True),       # L40S
    ("tensorwise", (9, 0), True),    # H100/H200
    ("blockwise", (8, 9), False),
    ("blockwise", (9, 0), True),
    ("mxfp8", (9, 0), False),        # Hopper has no MXFP8
    ("mxfp8", (10, 0), True),        # B200
    ("mxfp8", (12, 0), False),       # workstation Blackwell: no MXFP8 in TE's matrix
])
def test_fp8_recipe_needs_its_compute_capability(monkeypatch, recipe, capability, ok):
    _machine(monkeypatch, TE_GPU, capability)
    overrides = ("model.fp8=hybrid", f"model.fp8_recipe={recipe}")
    if ok:
        assert _validate(*overrides).model.fp8_recipe == recipe
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    with pytest.raises(RuntimeError, match=f"fp8 recipe '{recipe}' needs compute capability sm_.*; "
                                           f"this GPU is {sm}") as err:
        _validate(*overrides)
    assert "\n" not in str(err.value)


def test_teacher_fp8_is_checked_on_its_own(monkeypatch):
    _machine(monkeypatch, TE_GPU, (8, 0))
    _validate("model.fp8_recipe=tensorwise")  # neither asks for FP8: nothing to check
    with pytest.raises(RuntimeError, match="model.teacher_fp8: fp8 recipe 'tensorwise'"):
        _validate("model.teacher_fp8=hybrid", "model.fp8_recipe=tensorwise")


def test_build_refuses_fp8_through_the_same_check(monkeypatch):
    """BuildOptions users (benchmarks, tests) meet the same check as the config."""
    from tip_megatron.models.build import BuildOptions, transformer_config

    _machine(monkeypatch, TE_GPU, (8, 0))
    _backend(monkeypatch, Device("cpu", "gloo"))
    with pytest.raises(RuntimeError, match="model.fp8: fp8 recipe 'delayed' needs compute capability sm_89"):
        transformer_config(None, None, BuildOptions(spec="te", fp8="hybrid"))


def test_gpu_fusions_follow_the_kernels_present(monkeypatch):
    """On a bare CUDA machine (no apex, no compiled softmax) the local spec must not ask
    for the fused softmax or the persistent layer norm (megatron's torch norm asserts it)."""
    from types import SimpleNamespace

    from tip_megatron.models.build import BuildOptions, transformer_config
    from tip_megatron.runtime.parallel import ParallelLayout
    from tip_megatron.testing.models import tiny_arch

    _backend(monkeypatch, Device("cuda", "nccl"))
    groups = SimpleNamespace(layout=ParallelLayout())
    bare = OptionalDeps(transformer_engine=False, apex=False, wandb=False, cuda=True)
    monkeypatch.setattr(build, "optional_deps", lambda: bare)
    cfg = transformer_config(tiny_arch(), groups, BuildOptions(spec="local"))
    assert cfg.params_dtype == torch.bfloat16 and cfg.bias_dropout_fusion
    assert not cfg.masked_softmax_fusion and not cfg.persist_layer_norm
    ngc = OptionalDeps(transformer_engine=True, apex=True, wandb=False, cuda=True,
                                softmax_kernels=True)
    monkeypatch.setattr(build, "optional_deps", lambda: ngc)
    cfg = transformer_config(tiny_arch(), groups, BuildOptions(spec="local"))
    assert cfg.masked_softmax_fusion and cfg.persist_layer_norm

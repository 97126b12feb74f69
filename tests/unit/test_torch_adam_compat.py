"""The torch-Adam checkpoint fix (runtime.megatron_compat.apply_torch_adam_compat) is
applied by the condition it depends on, megatron's `HAVE_APEX_OR_TE` (apex/TE FusedAdam
absent), whatever the device: with the device probe reporting CUDA and apex/TE absent it
is applied; with apex/TE present it is not, on the CPU as well. Its behaviour (exact
losses after a resume) is covered by tests/distributed/test_trainer.py.
"""
import inspect

import pytest
import torch

from tip_megatron.runtime import megatron_compat
from tip_megatron.runtime.device import Device

distrib = pytest.importorskip("megatron.core.optimizer.distrib_optimizer")
CLS = distrib.DistributedOptimizer


@pytest.fixture
def pristine(monkeypatch):
    """megatron's own `_set_main_param_and_optimizer_states` (an earlier test may have
    patched the class; monkeypatch restores whatever was there after the test)."""
    original = inspect.unwrap(CLS._set_main_param_and_optimizer_states)
    monkeypatch.setattr(CLS, "_set_main_param_and_optimizer_states", original)
    return original


def _set_device(monkeypatch, device: Device) -> None:
    """The device probe reports `device` (CUDA on this CPU machine too), and so does torch."""
    monkeypatch.setattr(megatron_compat, "default_backend", lambda: device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device.is_cuda)


@pytest.mark.parametrize("device", [Device("cuda", "nccl"), Device("cpu", "gloo")])
def test_applied_without_apex_te_whatever_the_device(monkeypatch, pristine, device):
    _set_device(monkeypatch, device)
    monkeypatch.setattr(distrib, "HAVE_APEX_OR_TE", False)
    assert megatron_compat.apply_torch_adam_compat() is True
    patched = CLS._set_main_param_and_optimizer_states
    assert patched is not pristine and inspect.unwrap(patched) is pristine
    assert megatron_compat.apply_torch_adam_compat() is True  # idempotent: wrapped once
    assert CLS._set_main_param_and_optimizer_states is patched


@pytest.mark.parametrize("device", [Device("cuda", "nccl"), Device("cpu", "gloo")])
def test_not_applied_with_apex_or_te(monkeypatch, pristine, device):
    _set_device(monkeypatch, device)
    monkeypatch.setattr(distrib, "HAVE_APEX_OR_TE", True)
    assert megatron_compat.apply_torch_adam_compat() is False
    assert CLS._set_main_param_and_optimizer_states is pristine


def test_cpu_compat_alone_leaves_the_optimizer_class(monkeypatch, pristine):
    """The CPU redirect no longer carries the torch-Adam patch: each fix has its own condition."""
    megatron_compat.apply_cpu_compat()
    assert CLS._set_main_param_and_optimizer_states is pristine


def test_wrapper_passes_a_skippable_step(monkeypatch, pristine):
    calls = []

    def recording(self, model_param, tensors):
        calls.append(dict(tensors))

    monkeypatch.setattr(CLS, "_set_main_param_and_optimizer_states", recording)
    monkeypatch.setattr(distrib, "HAVE_APEX_OR_TE", False)
    assert megatron_compat.apply_torch_adam_compat() is True
    CLS._set_main_param_and_optimizer_states(object(), "param", {"exp_avg": 1, "step": 3})
    CLS._set_main_param_and_optimizer_states(object(), "param", {"exp_avg": 2})
    assert calls == [{"step": 3, "exp_avg": 1}, {"step": None, "exp_avg": 2}]


@pytest.mark.parametrize("qualname,fragment", [
    ("load_parameter_state_from_fully_reshardable", 'if k == "step":'),
    ("_set_main_param_and_optimizer_states", "tensors[key]"),
    ("load_state_dict", "if not HAVE_APEX_OR_TE"),
])
def test_megatron_still_assumes_fused_adam_here(qualname, fragment):
    source = inspect.getsource(inspect.unwrap(getattr(CLS, qualname)))
    assert fragment in source, (f"megatron-core changed DistributedOptimizer.{qualname}: the "
                                "torch-Adam fix in runtime/megatron_compat.py may be stale")

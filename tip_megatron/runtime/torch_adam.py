"""torch Adam's `step` under megatron-core's DistributedOptimizer (no apex/TE FusedAdam)."""
from __future__ import annotations

from typing import Any

import torch


# torch Adam's `step` under megatron's DistributedOptimizer ----------------------------
# Without apex/TE (megatron's `HAVE_APEX_OR_TE` is False, on any device: a plain pip
# install on a GPU cluster too), megatron-core 0.19.2's DistributedOptimizer wraps torch
# Adam, whose per-parameter state holds a `step` tensor that megatron's checkpoint code
# (written for apex/TE FusedAdam, which keeps `step` in param_groups) mishandles in three
# places:
# 1. `load_parameter_state_from_fully_reshardable` drops `step` from the loaded tensors that
#    `_set_main_param_and_optimizer_states` then expects: patched by
#    `runtime.megatron_compat.apply_torch_adam_compat` (the one module that patches megatron).
# 2. `DistributedOptimizer.sharded_state_dict(is_loading=True)` reads `state[p]["step"]`
#    of every parameter, which a torch Adam that has not stepped yet does not have:
#    `prepare_torch_adam_for_load`, called before building the state dict to load into.
# 3. `DistributedOptimizer.load_state_dict` (its `if not HAVE_APEX_OR_TE` branch) gives
#    every parameter state ONE shared `step` tensor: `unshare_torch_adam_steps` after it.
# checkpoint/training.py applies all three around every optimizer load when
# `megatron_wraps_torch_adam()`; the resume tests in tests/distributed/test_trainer.py
# (exact losses after a resume, a resume after a kill during a save) cover them, and
# tests/unit/test_torch_adam_compat.py the condition.
def megatron_wraps_torch_adam() -> bool:
    """True when megatron's DistributedOptimizer wraps torch Adam: neither TE's nor apex's
    FusedAdam imported (megatron's own `HAVE_APEX_OR_TE` flag, whatever the device)."""
    from megatron.core.optimizer import distrib_optimizer  # heavy: only when a checkpoint loads

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _torch_optimizers(optimizer: Any) -> list:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]]


def prepare_torch_adam_for_load(optimizer: Any) -> None:
    """Give a fresh torch Adam the state it creates lazily on its first step (2. above).

    Zeros are what Adam starts from, and loading overwrites them.
    """
    for torch_opt in _torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if len(torch_opt.state[p]) == 0:
                    torch_opt.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p.data),
                        "exp_avg_sq": torch.zeros_like(p.data),
                    }


def unshare_torch_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam `step` tensor after a load (3. above).

    torch Adam increments `state["step"]` in place per parameter, so a shared tensor
    advances once per parameter per step and the bias correction drifts (measured: the
    second step after a resume differed).
    """
    for torch_opt in _torch_optimizers(optimizer):
        for state in torch_opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

"""megatron-core on machines without CUDA: the ONE module that patches megatron.

This is the ONE module that adapts megatron-core to this machine; nothing else in
tip_megatron patches megatron. Two independent fixes, each applied by its own condition:
- megatron-core 0.19.2 hard-codes CUDA in a handful of places (see
  `MEGATRON_CUDA_ASSUMPTIONS`); without CUDA, `apply_cpu_compat()` redirects each of them
  to the CPU. On a CUDA machine it touches nothing.
- Without apex/TE FusedAdam (megatron's `HAVE_APEX_OR_TE` is False) its distributed
  optimizer wraps torch Adam and mis-loads its `step` (`TORCH_ADAM_ASSUMPTION`);
  `apply_torch_adam_compat()` fixes that whatever the device (a GPU machine with a plain
  pip install too), and does nothing when apex or TE is present. runtime/torch_adam.py
  holds the state helpers that go with it (they patch nothing).

How the redirect works, and why this shape:
- Most of megatron's CUDA assumptions are calls through its modules' global `torch` name:
  `torch.cuda.current_device()`, `torch.zeros(..., device="cuda")`, `torch.cuda.Stream`,
  `torch.cuda.get_rng_state()`. Each megatron.core module's `torch` global is replaced by
  `_CpuTorch`, a thin view of the real torch whose `cuda` namespace and tensor factories
  answer with the CPU. torch itself stays untouched, so our own code and every other
  library see the real thing.
- Two kinds of assumption are tensor *methods* and cannot be reached through a module
  global: `tensor.cuda()` (tied output weights, gloo paths) and `tensor.type()` string
  checks (`'torch.cuda.FloatTensor'` in the optimizers and grad clipping). Those megatron
  functions are wrapped so that, only while they run, `Tensor.cuda` returns the CPU tensor
  and `Tensor.type()` reports the CUDA type name of the same dtype.
- The CUDA RNG tracker states become CPU generator states.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
import types
from typing import Any, Callable, Iterator

import torch

from tip_megatron.runtime.device import default_backend
from tip_megatron.runtime.torch_adam import megatron_wraps_torch_adam

logger = logging.getLogger(__name__)


#: Every place megatron-core 0.19.2 assumes CUDA that our code paths reach, with the
#: redirect applied. Each entry is covered by tests/unit/test_platform.py, which fails if
#: megatron changes underneath (the assumption disappears or moves).
MEGATRON_CUDA_ASSUMPTIONS = {
    "rng_tracker": "tensor_parallel.random: CUDA RNG states -> CPU generator states",
    "current_device": "torch.cuda.current_device() allocations -> 'cpu' (rotary, mappings, "
    "attention, p2p_communication, param_and_grad_buffer, ...)",
    "device_cuda_literal": 'device="cuda" in schedules (total_num_tokens), '
    "transformer/utils causal mask, optimizer, clip_grads, grad_scaler, "
    "tensor_parallel/data, rerun_state_machine -> cpu",
    "streams": "torch.cuda.Stream / stream() / current_stream() / synchronize() in DDP, "
    "p2p and the dist_checkpointing savers -> no-ops",
    "tensor_cuda_method": "Tensor.cuda() on the tied output weight "
    "(LanguageModule.setup_embeddings_and_output_layer) and when gathering the distributed "
    "optimizer state for a checkpoint (get_parameter_state_dp_zero) -> stays on CPU",
    "type_strings": "Tensor.type() == 'torch.cuda.FloatTensor' checks in clip_grads and "
    "the (distributed) optimizers -> CUDA type names reported for CPU tensors",
}

#: The one assumption of megatron-core 0.19.2 on apex/TE rather than CUDA, patched by
#: `apply_torch_adam_compat()` whenever apex/TE are absent, whatever the device.
TORCH_ADAM_ASSUMPTION = (
    "without apex/TE the distributed optimizer wraps torch Adam, whose state holds a 'step' "
    "tensor that DistributedOptimizer._set_main_param_and_optimizer_states expects in the "
    "loaded checkpoint tensors (load_parameter_state_from_fully_reshardable drops it) -> "
    "'step' is skipped there (it is restored from param_groups)"
)

_APPLIED = False


def megatron_config_overrides() -> dict:
    """TransformerConfig fields that must differ from megatron's defaults on this device.

    `batch_p2p_comm=False` on gloo: the batched pipeline p2p posts, on one rank,
    [send_prev, recv_prev, send_next, recv_next]. With PP=2 and virtual stages, prev and
    next are the same peer, so one rank posts (grad, activation) while its peer posts
    (activation, grad) for tensors of equal shape and tag; gloo matches them in posting
    order and swaps them (measured: wrong losses from the 3rd micro-batch on). NCCL groups
    the batch; on gloo the unbatched path orders sends/receives by even/odd rank instead.
    """
    if default_backend().is_cuda:
        return {}
    return {"batch_p2p_comm": False}


def cpu_compat_applied() -> bool:
    return _APPLIED


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is ordered by program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as megatron modules see it on a CPU machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NullStream:
        return _NullStream()

    @staticmethod
    def stream(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    Stream = _NullStream
    Event = _NullStream


class _CpuTorch(types.ModuleType):
    """`torch` as megatron modules see it on a CPU machine: CUDA requests land on the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like",
                  "zeros_like", "ones_like", "randn", "rand", "randint", "as_tensor")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))
        self.device = _cpu_torch_device
        self.autocast = _cpu_autocast

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_torch_device(*args: Any, **kwargs: Any) -> torch.device:
    if args and isinstance(args[0], str) and args[0].startswith("cuda"):
        return torch.device("cpu")
    return torch.device(*args, **kwargs)


def _cpu_autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


_CPU_TORCH = _CpuTorch()

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_tensor_methods() -> Iterator[None]:
    """While active: `Tensor.cuda()` keeps the tensor on the CPU and `Tensor.type()`
    reports CUDA type names. Scoped to the megatron functions wrapped below."""
    orig_cuda, orig_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return orig_type(self, *args, **kwargs)
        return _CUDA_TYPE_NAMES.get(self.dtype, orig_type(self))

    torch.Tensor.cuda, torch.Tensor.type = cuda, type_
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = orig_cuda, orig_type


def _with_cuda_tensor_methods(fn: Callable) -> Callable:
    if getattr(fn, "_tip_cpu_wrapped", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    wrapper._tip_cpu_wrapped = True  # type: ignore[attr-defined]
    return wrapper


#: (module, qualified attribute) of megatron functions that call Tensor.cuda()/.type().
_TENSOR_METHOD_SITES = (
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
)

#: megatron modules imported before the redirect so that their `torch` global is swapped.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.utils",
)


def _resolve(module: types.ModuleType, qualname: str) -> tuple[Any, str]:
    owner: Any = module
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def _rebind_everywhere(original: Any, replacement: Any) -> None:
    """Replace `original` wherever megatron bound it (its home and every `from x import`)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core"):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


def _redirect_rng_tracker() -> None:
    random = sys.modules["megatron.core.tensor_parallel.random"]

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    _rebind_everywhere(random._get_cuda_rng_state, get_state)
    _rebind_everywhere(random._set_cuda_rng_state, set_state)


def _swap_torch_globals() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _CPU_TORCH


def apply_cpu_compat() -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU. Idempotent.

    Does nothing (and returns False) when CUDA is available. Returns True when the
    redirect is in place. Call it before building models or process groups; modules of
    megatron.core imported later are swapped by the next call (every entry point calls it).
    """
    global _APPLIED
    if default_backend().is_cuda:
        return False
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    _swap_torch_globals()
    if not _APPLIED:
        _redirect_rng_tracker()
        for module_name, qualname in _TENSOR_METHOD_SITES:
            owner, attr = _resolve(sys.modules[module_name], qualname)
            raw = inspect.getattr_static(owner, attr)
            # Keep staticmethod/classmethod descriptors: wrap the function inside them.
            kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
            original = raw.__func__ if kind else raw
            wrapped = _with_cuda_tensor_methods(original)
            setattr(owner, attr, kind(wrapped) if kind else wrapped)
            _rebind_everywhere(original, wrapped)
        _APPLIED = True
        logger.info("megatron-core CPU compatibility applied (%d redirects)",
                    len(MEGATRON_CUDA_ASSUMPTIONS))
    return True


# torch Adam under megatron's DistributedOptimizer (no apex/TE), whatever the device ----
def apply_torch_adam_compat() -> bool:
    """Patch `TORCH_ADAM_ASSUMPTION` when megatron wraps torch Adam (apex/TE absent).
    Idempotent; True when the patch is in place, False when apex or TE is present (then
    megatron's FusedAdam path needs nothing and nothing is touched). Call it before
    loading a distributed optimizer's state (checkpoint/training.py does)."""
    if not megatron_wraps_torch_adam():
        return False
    distrib = sys.modules["megatron.core.optimizer.distrib_optimizer"]
    cls = distrib.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_tip_torch_adam_wrapped", False):
        return True

    @functools.wraps(original)
    def wrapper(self: Any, model_param: Any, tensors: dict) -> Any:
        # A non-tensor entry is skipped by megatron's copy loop; step is set elsewhere.
        return original(self, model_param, {"step": None, **tensors})

    wrapper._tip_torch_adam_wrapped = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = wrapper
    logger.info("megatron-core torch-Adam checkpoint fix applied (no apex/TE FusedAdam)")
    return True

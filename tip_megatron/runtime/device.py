"""Where this process computes: the device and the collective backend.

`default_backend()` is the one place that decides between CUDA + nccl and CPU + gloo
(`TIP_MEGATRON_DEVICE=cpu` forces the CPU path on a GPU machine).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Device:
    """Where tensors live and which collective backend carries them."""

    type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


def default_backend() -> Device:
    """nccl + cuda when CUDA is usable; gloo + cpu otherwise.

    `TIP_MEGATRON_DEVICE=cpu` forces the CPU path on a GPU machine (useful for debugging
    numerics against the CPU reference).
    """
    forced = os.environ.get("TIP_MEGATRON_DEVICE", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"TIP_MEGATRON_DEVICE={forced!r}: accepted values are 'cpu' and 'cuda'")
    if forced == "cuda" and not torch.cuda.is_available():
        raise ValueError("TIP_MEGATRON_DEVICE=cuda but torch.cuda.is_available() is False")
    if forced != "cpu" and torch.cuda.is_available():
        return Device("cuda", "nccl")
    return Device("cpu", "gloo")


def current_device() -> torch.device:
    """The torch.device this process computes on (the local GPU under torchrun)."""
    if default_backend().is_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_dtype(params_dtype: Optional[torch.dtype] = None, on_gpu: Optional[bool] = None) -> torch.dtype:
    """The dtype models are built in: `params_dtype` when set, else bf16 on a GPU and fp32
    on CPU (`model.dtype=auto`); `on_gpu` None: this process's backend decides."""
    if params_dtype is not None:
        return params_dtype
    if on_gpu is None:
        on_gpu = default_backend().is_cuda
    return torch.bfloat16 if on_gpu else torch.float32


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the current GPU; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def quiet_third_party_warnings() -> None:
    """Silence known-harmless warnings in command-line runs (not on import of the library).

    megatron-core warns once per module that TE/apex are absent (we probe them ourselves,
    see `optional_deps`), that GPTModel is deprecated (see docs/design_notes.md), and
    calls torch.distributed APIs torch marks as deprecated.
    """
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    # "full_param_layout not provided": DDP computes the layout itself, as intended here.
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)


def release_freed_host_memory() -> bool:
    """Hand the host memory freed so far back to the system (glibc's `malloc_trim(0)`);
    False where there is no glibc. Loading and saving checkpoints frees many tensors below
    glibc's mmap threshold (32 MiB at most: a layer's slice of a merged SwiGLU weight, a
    read buffer) in the middle of the heap, which glibc keeps resident for reuse: measured
    ~0.8 GiB per rank after a Qwen3-0.6B-shaped resume at TP 2 (docs/plan.md), host memory
    that the rest of the run then never got back. Cheap (a walk of the free lists)."""
    import ctypes  # only here: the one caller of libc

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False

"""Optional dependencies (Transformer Engine, apex, wandb, CUDA), probed once, and the one
place FP8 support is decided.

`require(dep, feature)` raises a one-line error naming the package and the feature when a
run asks for something this machine lacks; never a stand-in.
"""
from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import torch

from tip_megatron.runtime.device import cuda_capability

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionalDeps:
    transformer_engine: bool
    apex: bool
    wandb: bool
    cuda: bool
    softmax_kernels: bool = False
    """megatron's compiled fused-softmax extension (`scaled_masked_softmax_cuda`, built by
    apex / the NGC container); without it `masked_softmax_fusion` fails at the first
    attention of a bf16 sequence of 16 < s <= 4096 tokens."""

    @property
    def te_usable(self) -> bool:
        """TE layers need both the package and a GPU."""
        return self.transformer_engine and self.cuda


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install (e.g. TE without cudnn) is "absent"
        return False
    return True


def _is_nvidia_apex() -> bool:
    # The PyPI package called `apex` is an unrelated web framework; NVIDIA apex has
    # `apex.optimizers.FusedAdam` (and comes with the NGC container).
    return _importable("apex.optimizers")


@functools.lru_cache(maxsize=1)
def optional_deps() -> OptionalDeps:
    cuda = torch.cuda.is_available()
    deps = OptionalDeps(
        transformer_engine=cuda and _importable("transformer_engine.pytorch"),
        apex=cuda and _is_nvidia_apex(),
        wandb=_importable("wandb"),
        cuda=cuda,
        softmax_kernels=cuda and _importable("scaled_masked_softmax_cuda"),
    )
    logger.debug("optional dependencies: %s", deps)
    return deps


_INSTALL_HINTS = {
    "transformer_engine": "Transformer Engine needs CUDA: use an NGC PyTorch container or "
    "`pip install 'tip_megatron[te]'` on a CUDA machine",
    "apex": "NVIDIA apex comes with the NGC PyTorch container (never `pip install apex`: "
    "that PyPI name is an unrelated package)",
    "wandb": "`pip install 'tip_megatron[wandb]'`, or set logging.wandb=false",
    "cuda": "a CUDA GPU and a CUDA build of torch",
}


def require(dep: str, feature: str) -> None:
    """Raise a clear error when `feature` needs optional dependency `dep` and it is absent."""
    deps = optional_deps()
    available = {
        "transformer_engine": deps.te_usable,
        "apex": deps.apex,
        "wandb": deps.wandb,
        "cuda": deps.cuda,
    }
    if dep not in available:
        raise ValueError(f"unknown optional dependency {dep!r}; known: {sorted(available)}")
    if not available[dep]:
        raise RuntimeError(f"{feature} needs {dep}, which is not available here: {_INSTALL_HINTS[dep]}")


#: Compute capability each megatron fp8_recipe needs, as (lowest, first unsupported), from
#: Transformer Engine's support matrix: per-tensor FP8 (delayed, tensorwise) from Ada
#: (sm_89); FP8 block scaling from Hopper (sm_90); MXFP8 only on data-center Blackwell
#: (sm_100/sm_103; not the sm_120 workstation parts).
FP8_RECIPE_MIN_CAPABILITY = {
    "delayed": ((8, 9), None),
    "tensorwise": ((8, 9), None),
    "blockwise": ((9, 0), None),
    "mxfp8": ((10, 0), (12, 0)),
}


def check_fp8(recipe: str, feature: str) -> None:
    """Raise a one-line error when FP8 `recipe` cannot run here (no TE/GPU, or a GPU whose
    compute capability lacks the recipe). The single place FP8 support is decided."""
    if recipe not in FP8_RECIPE_MIN_CAPABILITY:
        raise ValueError(f"{feature}: fp8 recipe {recipe!r}: accepted values are "
                         f"{list(FP8_RECIPE_MIN_CAPABILITY)}")
    require("transformer_engine", feature)
    capability = cuda_capability()
    low, high = FP8_RECIPE_MIN_CAPABILITY[recipe]
    if capability is not None and low <= capability and (high is None or capability < high):
        return
    span = f"sm_{low[0]}{low[1]}" + (f" up to (not incl.) sm_{high[0]}{high[1]}" if high else "+")
    here = (f"this GPU is sm_{capability[0]}{capability[1]}" if capability is not None
            else "no GPU is visible")
    raise RuntimeError(f"{feature}: fp8 recipe {recipe!r} needs compute capability {span}; {here}")

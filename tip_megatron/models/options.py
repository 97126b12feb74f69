"""The run config's `model:` section: how both models are built (layer spec, dtype, FP8,
recompute). docs/precision.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tip_megatron.runtime.optional import FP8_RECIPE_MIN_CAPABILITY, check_fp8
from tip_megatron.runtime.typed_tree import at_least, check_choice


@dataclass(frozen=True)
class ModelOptions:
    """How models are built (both student and teacher). See docs/precision.md."""

    spec: str = "auto"
    """Layer implementation: auto (TE on GPU when importable, else local), local, te."""
    dtype: str = "auto"
    """Parameter and activation dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32. With
    bf16 the optimizer keeps fp32 main params and grads; TIP statistics and the KL are fp32."""
    fp8: Optional[str] = None
    """FP8 format of the student's TE layers: hybrid (e4m3 fwd, e5m2 grads), e4m3; null =
    off. The output layer and the TIP statistics never run in FP8. TE + a capable GPU only."""
    teacher_fp8: Optional[str] = None
    """FP8 format of the frozen teacher's forward-only pass (hybrid, e4m3; null = off),
    independent of `fp8`; same recipe settings."""
    fp8_recipe: str = "delayed"
    """megatron's fp8_recipe: delayed (sm_89+), tensorwise (sm_89+), blockwise (sm_90+),
    mxfp8 (sm_100 Blackwell)."""
    fp8_amax_history_len: int = 1
    """Amax history window of the delayed recipe (megatron's default 1)."""
    fp8_amax_compute_algo: str = "most_recent"
    """How the delayed recipe picks amax from its history: most_recent, max."""
    recompute_granularity: Optional[str] = None
    """Activation recompute: null, selective (core attention), full (every layer)."""

    def validate(self, prefix: str = "model.") -> None:
        """Values, then (when FP8 is asked for) whether this machine can run it."""
        choices = {"spec": ("auto", "local", "te"), "dtype": ("auto", "bf16", "fp32"),
                   "fp8": (None, "hybrid", "e4m3"), "teacher_fp8": (None, "hybrid", "e4m3"),
                   "fp8_recipe": tuple(FP8_RECIPE_MIN_CAPABILITY),
                   "fp8_amax_compute_algo": ("most_recent", "max"),
                   "recompute_granularity": (None, "selective", "full")}
        for name, accepted in choices.items():
            check_choice(prefix, self, name, accepted)
        at_least(prefix, self, fp8_amax_history_len=1)
        for name in ("fp8", "teacher_fp8"):
            if getattr(self, name) is None:
                continue
            if self.spec == "local":
                raise ValueError(f"{prefix}{name}={getattr(self, name)!r} needs the Transformer "
                                 f"Engine layer spec: set {prefix}spec=te or auto")
            check_fp8(self.fp8_recipe, f"{prefix}{name}")

    @property
    def params_dtype(self) -> Optional[torch.dtype]:
        """The torch dtype of `dtype`; None for auto (the device decides)."""
        return {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

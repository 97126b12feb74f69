"""How much memory one accelerator has, from a number or a GPU name.

    gpu_memory_gib("h100")   -> 79.6      gpu_memory_gib(80) -> 80.0
    gpu_memory_gib("80GiB")  -> 80.0      gpu_memory_gib("80GB") -> 74.5 (10^9 bytes)

Used by `parallel.gpu_memory_gib` (config) and `tip-megatron plan --gpu-mem`.
"""
from __future__ import annotations

import math
import re
from typing import Union

#: Usable memory of common accelerators in GiB (`nvidia-smi` total, not the marketing GB).
GPU_MEMORY_GIB = {
    "a100-40gb": 39.4, "a100": 79.3, "a100-80gb": 79.3, "l40s": 44.4, "h100": 79.6,
    "h100-80gb": 79.6, "h100-94gb": 93.1, "h200": 139.8, "gh200": 94.5, "b200": 178.4,
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*$", re.IGNORECASE)


def gpu_memory_gib(value: Union[int, float, str], key: str = "gpu memory") -> float:
    """GiB of one GPU from a number (GiB), '<n>GiB', '<n>GB' (10^9 bytes) or a name of
    `GPU_MEMORY_GIB`; ValueError naming `key`, the value and what is accepted."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)):
        gib = float(value)
    else:
        name = value.strip().lower()
        match = _SIZE.match(name)
        if name in GPU_MEMORY_GIB:
            gib = GPU_MEMORY_GIB[name]
        elif match:
            unit = (match.group(2) or "gib").lower()
            gib = float(match.group(1)) * (1e9 / 2**30 if unit == "gb" else 1.0)
        else:
            gib = math.nan
    if not 0 < gib < math.inf:
        raise ValueError(f"{key}={value!r}: not a memory size; accepted: a number of GiB > 0 "
                         f"(80, '80GiB', '80GB' = 10^9 bytes) or a GPU name "
                         f"({', '.join(sorted(GPU_MEMORY_GIB))})")
    return gib

"""HF <-> Megatron checkpoint conversion for llama, qwen2 and qwen3 (see docs/convert.md).

    hf_to_mcore(hf_dir, ckpt_dir, ImportOptions(tp=2, pp=2))   # -> model checkpoint
    mcore_to_hf(ckpt_dir, hf_dir)                              # -> safetensors + config
"""
from __future__ import annotations

import importlib

#: public name -> module that defines it. Imported on first use: `tip-megatron --help`
#: imports `tip_megatron.apps.convert_cmd`, hence this package, and must not import torch.
_EXPORTS = {
    "mcore_to_hf": "exporter", "HFCheckpoint": "hf_io", "ImportOptions": "importer",
    "hf_to_mcore": "importer", "full_to_hf": "mapping", "hf_to_full": "mapping",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tip_megatron.checkpoint.hf.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

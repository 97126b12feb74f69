"""HF <-> Megatron checkpoint conversion for llama, qwen2 and qwen3 (see docs/convert.md).

    hf_to_mcore(hf_dir, ckpt_dir, ImportOptions(tp=2, pp=2))   # -> model checkpoint
    mcore_to_hf(ckpt_dir, hf_dir)                              # -> safetensors + config
"""
from tip_megatron.convert.exporter import mcore_to_hf
from tip_megatron.convert.hf_io import HFCheckpoint
from tip_megatron.convert.importer import ImportOptions, hf_to_mcore
from tip_megatron.convert.mapping import full_to_hf, hf_to_full

__all__ = ["HFCheckpoint", "ImportOptions", "full_to_hf", "hf_to_full", "hf_to_mcore", "mcore_to_hf"]

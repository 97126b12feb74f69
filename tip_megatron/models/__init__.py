"""Model families (llama, qwen2, qwen3): architecture config, megatron build, state dicts."""
from tip_megatron.models.arch import FAMILIES, ModelArch, RopeScaling, padded_vocab_size
from tip_megatron.models.build import BuildOptions, build_model

__all__ = ["FAMILIES", "ModelArch", "RopeScaling", "padded_vocab_size", "BuildOptions", "build_model"]

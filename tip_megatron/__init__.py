"""tip_megatron: on-policy distillation with TIP token selection on megatron-core."""
__version__ = "0.1.0"

"""Convert checkpoints between Hugging Face and tip_megatron (same as `tip-megatron convert`).

    python tools/convert_checkpoint.py hf-to-mcore --hf Llama-3.2-1B/ --out ckpt/llama --tp 2
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/llama --out llama-hf/

See docs/convert.md.
"""
import sys

from tip_megatron.apps.convert_cmd import main

if __name__ == "__main__":  # dist_checkpointing's writer spawns a process: keep the guard
    sys.exit(main())

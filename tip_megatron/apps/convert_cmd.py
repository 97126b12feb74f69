"""`tip-megatron convert hf-to-mcore | mcore-to-hf` (also `python tools/convert_checkpoint.py`).

    tip-megatron convert hf-to-mcore --hf Qwen3-8B/ --out ckpt/qwen3-8b --tp 2 --pp 2
    tip-megatron convert mcore-to-hf --ckpt ckpt/qwen3-8b --out qwen3-8b-hf/

hf-to-mcore starts tp*pp local CPU ranks itself; under `torchrun --nproc-per-node tp*pp`
each process is one rank instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from tip_megatron.runtime.env import rank_env

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and megatron",
        description="Convert checkpoints between Hugging Face (safetensors) and tip_megatron's "
        "megatron model checkpoint (dist_checkpointing; loads at any TP/PP).",
    )
    add_subcommands(parser)


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)
    imp = sub.add_parser("hf-to-mcore", help="HF checkpoint -> model checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="model checkpoint directory to write")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saving world")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saving world")
    imp.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="parameter dtype (default: the HF config's dtype, else float32)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="accept pytorch_model*.bin pickles (loaded with weights_only=True)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.set_defaults(func=_hf_to_mcore)

    exp = sub.add_parser("mcore-to-hf", help="model checkpoint -> HF checkpoint")
    exp.add_argument("--ckpt", required=True,
                     help="model checkpoint, training step directory (<run>/step_000200) "
                     "or run directory (its newest complete step)")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="dtype of the HF weights (default: the checkpoint's params_dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp.add_argument("--max-abs-weight", type=float, default=1e4,
                     help="refuse to export a weight with |w| above this (a damaged checkpoint or a "
                     "diverged run; default 1e4; 0: no bound; NaN/inf are always refused)")
    exp.set_defaults(func=_mcore_to_hf)


#: Problems with the inputs, found before any work starts: one line, exit code 2.
_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    # lazy: the converter imports torch; --help must not
    from tip_megatron.checkpoint.hf.importer import ImportOptions, check_import, hf_to_mcore

    options = ImportOptions(tp=args.tp, pp=args.pp, dtype=args.dtype,
                            allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    try:
        check_import(args.hf, args.out, options)
    except _USER_ERRORS as err:
        return _fail(err)
    out = hf_to_mcore(args.hf, args.out, options)
    if rank_env().rank == 0:  # under torchrun every rank gets here
        print(f"wrote model checkpoint {out}")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    # lazy: the converter imports torch; --help must not
    from tip_megatron.checkpoint.hf.exporter import check_export, mcore_to_hf

    try:
        if not args.max_abs_weight >= 0:  # NaN too
            raise ValueError(f"--max-abs-weight {args.max_abs_weight}: accepted: a number >= 0 "
                             "(0: no bound)")
        check_export(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
        # ValueError: a tensor out of bounds (named), found while reading; --out not written
        out = mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite, max_abs_weight=args.max_abs_weight, verify=False)
    except _USER_ERRORS as err:
        return _fail(err)
    print(f"wrote HF checkpoint {out}")
    return 0


def _fail(err: Exception) -> int:
    print(f"tip-megatron convert: error: {err}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of tools/convert_checkpoint.py: `hf-to-mcore ...` / `mcore-to-hf ...`."""
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint",
        description="Convert checkpoints between Hugging Face and tip_megatron (docs/convert.md).",
    )
    add_subcommands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

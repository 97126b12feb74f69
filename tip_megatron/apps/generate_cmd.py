"""`tip-megatron generate`: sample from a model checkpoint, one JSON line per sample.

    tip-megatron generate --ckpt ckpt/qwen3 --prompts prompts.jsonl --out samples.jsonl \\
        --max-new-tokens 256 --temperature 0.7 --top-p 0.95 --n 4 --seed 1
    tip-megatron generate --tp 2 --ckpt ... --out ...      # starts its 2 ranks itself
    torchrun --nproc-per-node 4 -m tip_megatron.apps.cli generate --tp 2 --pp 2 --ckpt ... --out ...

One process, or a torchrun world of tp * pp * dp processes (DP replicas take contiguous
slices of the prompts; rank 0 gathers and writes the file); from a plain shell with
--tp/--pp > 1 the command starts tp * pp local ranks itself, through torchrun. Prompts are
read by `data.prompts.PromptDataset` (docs/data.md); the samples are drawn by the one
sharded loop `eval.sharded.generate_shard` (the one `eval --ckpt` and validation during
training use: the same checkpoint, prompts and seed give the same samples whatever the
DP size or batch size) over `rollout.generate.generate` (docs/generate.md). Output
lines, in prompt order then sample order:
    {"prompt_id", "prompt_index", "sample_index", "token_ids" (generated ids, the stop token
     included), "text" (decoded without special tokens), "finish_reason" ("stop" |
     "length"), "num_prompt_tokens", "answer" (when the prompt row has one)}
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from tip_megatron.apps.launch import needs_own_ranks, run_cli_ranks
from tip_megatron.runtime.env import rank_env

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample continuations of prompts from a model checkpoint",
        description="Generate with the in-engine KV-cached sampler (TP/PP under torchrun).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="model checkpoint (tip-megatron convert), training step "
                   "directory (<run>/step_000200) or run directory (its newest step)")
    p.add_argument("--prompts", required=True, nargs="+", help="prompt files (.jsonl / .parquet)")
    p.add_argument("--out", required=True, help="JSONL file to write, one line per sample")
    add_generation_arguments(p)


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Every option but --ckpt, --prompts and --out (shared with `tip-megatron eval`)."""
    p.add_argument("--tokenizer", help="tokenizer path (default: the checkpoint's tokenizer/)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per sample (default 256)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    # --num-samples: torchrun reads a bare --n as an abbreviation of its own options.
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                   help="samples per prompt (--num-samples under torchrun)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (per DP rank)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--max-prompt-len", type=int,
                   help="longest prompt in tokens (default: max_position_embeddings - max_new_tokens)")
    p.add_argument("--overlong", choices=("truncate_left", "skip"), default="truncate_left",
                   help="what to do with longer prompts (default truncate_left; docs/data.md)")
    p.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="KV positions of the decode batch (default 0: all rows of a batch at once)")
    p.add_argument("--check-logprobs", action="store_true",
                   help="rerun each batch through the training forward and log the log-prob gap")
    p.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='extra chat template variables, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--system-prompt", help="system message put first in chat prompts that have none")
    # Multi-turn (docs/multiturn.md): the run config's rollout.env* keys.
    p.add_argument("--env", help="environment factory 'package.module:Factory' (multi-turn; "
                   "--max-new-tokens is then the budget of every turn and observation)")
    p.add_argument("--env-args", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments of the environment factory")
    p.add_argument("--max-turns", type=int, default=4, help="with --env: turns per sample (default 4)")
    p.add_argument("--turn-stop", nargs="+", default=[], metavar="STR",
                   help="with --env: strings that end a turn (e.g. '</call>')")
    p.add_argument("--observation-format", choices=("text", "tool"), default="text",
                   help="with --env: observations as text, or through the chat template's tool role")
    p.add_argument("--env-timeout-s", type=float, default=30.0,
                   help="with --env: seconds one environment call may take (default 30)")
    for field in ("prompt", "messages", "answer", "id"):
        p.add_argument(f"--{field}-field", default=field, help=f"name of the {field} field (default {field})")


def run(args: argparse.Namespace) -> int:
    if own_ranks(args):
        check_inputs(args)  # a bad input: one line here, before any rank starts
        return run_cli_ranks(args.tp * args.pp, torchrun_argv(args.argv))
    try:
        lines = generate_lines(args)
    except (ValueError, FileNotFoundError) as err:
        logger.debug("generate failed", exc_info=True)
        # Every rank says it: under torchrun the first rank to exit gets the others killed.
        print(f"tip-megatron generate: error: {err}", file=sys.stderr)
        return 2
    if lines is not None:
        write_lines(Path(args.out), lines)
    return 0


def check_inputs(args: argparse.Namespace) -> None:
    """What the ranks would find only after the model loads, found before they start (a
    ValueError, one line): the checkpoint, its architecture vs --tp / --pp, the tokenizer
    vs the vocabulary, the prompt length limit, and every prompt record, read and
    tokenized as the ranks will read them."""
    from tip_megatron.checkpoint.model import model_files  # torch: not before --help

    files = model_files(args.ckpt)
    arch = files.arch()
    try:
        arch.validate_parallel(args.tp, args.pp, 1)
    except ValueError as err:
        raise ValueError(f"--tp {args.tp} --pp {args.pp}: {args.ckpt} cannot be cut so: {err}") from None
    _dataset(args, _tokenizer(args, files, arch), arch)


def own_ranks(args: argparse.Namespace) -> bool:
    """Started from a plain shell with --tp/--pp > 1 (through `tip_megatron.apps.cli.main`):
    this process starts the tp * pp ranks itself, as `tip-megatron train` does."""
    return needs_own_ranks(args.tp * args.pp) and getattr(args, "argv", None) is not None


def torchrun_argv(argv: list[str]) -> list[str]:
    """`argv` with `--n` spelled `--num-samples`: torchrun would read a bare `--n` as an
    abbreviation of its own options."""
    return [("--num-samples" + a[3:]) if a == "--n" or a.startswith("--n=") else a for a in argv]


def generate_lines(args: argparse.Namespace) -> Optional[list[dict]]:
    """Sample `args.prompts` from `args.ckpt` in this torchrun world through the one sharded
    loop (`eval.sharded`, which validation during training uses too): every output line in
    (prompt, sample) order on rank 0, None on the other ranks."""
    # Start-up time of --help: torch, megatron and the model load only when generating.
    from tip_megatron.eval.sharded import gather_lines, generate_shard
    # heavy (torch, megatron): rank work; --help imports this module
    from tip_megatron.runtime import parallel

    world = rank_env().world_size
    if world % (args.tp * args.pp) != 0:
        raise ValueError(f"--tp {args.tp} --pp {args.pp} needs a multiple of {args.tp * args.pp} "
                         f"processes, got {world}: launch with torchrun --nproc-per-node "
                         f"{args.tp * args.pp}")
    groups = parallel.initialize(parallel.ParallelLayout(tp=args.tp, pp=args.pp), seed=args.seed)
    try:
        chunks, arch, tokenizer = _load(args, groups)
        lines = generate_shard(chunks, groups, arch, tokenizer, _dataset(args, tokenizer, arch),
                               _config(args, tokenizer), seed=args.seed,
                               batch_size=args.batch_size, progress=True)
        return gather_lines(lines, groups)
    finally:
        parallel.destroy()


def _load(args: argparse.Namespace, groups):
    # Start-up time of --help (as in generate_lines): torch and megatron load here.
    from tip_megatron.models import BuildOptions, build_model
    # heavy (torch, megatron): rank work; --help imports this module
    from tip_megatron.checkpoint.model import load_model_checkpoint, model_files

    files = model_files(args.ckpt)  # a model checkpoint, a training step or run directory
    arch = files.arch()
    tokenizer = _tokenizer(args, files, arch)
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    load_model_checkpoint(chunks, groups, files.path, expect_arch=arch)
    return chunks, arch, tokenizer


def _tokenizer(args: argparse.Namespace, files, arch):
    """--tokenizer or the checkpoint's; one with ids beyond the model's vocabulary refused
    (a smaller one is fine: ids >= its size are never sampled, `_config`'s vocab_limit)."""
    # heavy (torch, megatron): rank work; --help imports this module
    from tip_megatron.data.tokenizers import load_tokenizer

    tokenizer_path = args.tokenizer or files.tokenizer_dir
    if tokenizer_path is None or not Path(tokenizer_path).exists():
        raise ValueError(f"checkpoint {args.ckpt} bundles no tokenizer (tokenizer/, or a "
                         "run's model_meta/tokenizer/); pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path, chat_fallback=False)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
                         f"true vocabulary only {arch.vocab_size} (padded rows are no tokens): wrong "
                         f"--tokenizer for {args.ckpt}?")
    return tokenizer


def _config(args: argparse.Namespace, tokenizer):
    from tip_megatron.rollout.generate import GenerationConfig  # start-up time of --help (torch)

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, n=args.n, stop_ids=tuple(tokenizer.stop_ids),
        pad_id=tokenizer.pad_id, max_batch_tokens=args.max_batch_tokens, vocab_limit=tokenizer.vocab_size,
        check_logprobs=args.check_logprobs, **_multi_turn(args),
    )


def _multi_turn(args: argparse.Namespace) -> dict:
    """--env and its options as GenerationConfig keys ({} without --env: one turn)."""
    if not getattr(args, "env", None):
        return {}
    return dict(env=args.env, env_args=dict(args.env_args), max_turns=args.max_turns,
                turn_stop=tuple(args.turn_stop), observation_format=args.observation_format,
                env_timeout_s=args.env_timeout_s)


def _dataset(args: argparse.Namespace, tokenizer, arch):
    from tip_megatron.data.prompts import PromptDataset, PromptFields  # start-up time of --help

    room = arch.max_position_embeddings
    limit = args.max_prompt_len or room - args.max_new_tokens
    if not args.max_prompt_len and limit < 1:  # derived: name what the user passed
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: leaves no room for a prompt in the "
                         f"model's max_position_embeddings={room}; accepted: below {room}")
    if limit < 1 or limit + args.max_new_tokens > room:
        raise ValueError(f"--max-prompt-len {limit} + --max-new-tokens {args.max_new_tokens} must "
                         f"fit max_position_embeddings={room}")
    fields = PromptFields(prompt=args.prompt_field, messages=args.messages_field,
                          answer=args.answer_field, id=args.id_field)
    return PromptDataset(args.prompts, tokenizer, fields=fields, apply_chat_template=args.chat,
                         max_prompt_len=limit, overlong=args.overlong,
                         chat_template_kwargs=args.chat_template_kwargs,
                         system_prompt=args.system_prompt)


def _json_object(text: str) -> dict:
    """--chat-template-kwargs: a JSON object (argparse turns the ValueError into one line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def write_lines(path: Path, merged: list[dict]) -> None:
    """Written to a temporary file and renamed, so a failed run leaves no partial output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in merged:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    logger.info("wrote %d samples to %s", len(merged), path)

"""`tip-megatron eval`: grade samples (mean@k, pass@k), from a file or generated in-engine.

    tip-megatron eval --samples samples.jsonl --grader math --json summary.json
    tip-megatron eval --ckpt ckpt/qwen3-4b --prompts data/math500.jsonl --chat --n 16 \\
        --temperature 1.0 --max-new-tokens 8192 --json math500.json
    tip-megatron eval --tp 2 --ckpt ... --prompts ...       # starts its 2 ranks itself
    torchrun --nproc-per-node 2 -m tip_megatron.apps.cli eval --tp 2 --ckpt ... --prompts ...

`--ckpt` generates through `tip-megatron generate`'s code (apps.generate_cmd.generate_lines,
same options), i.e. the one sharded loop `eval.sharded.generate_shard` that validation
during training uses too: `eval --ckpt <run>/step_N` with validation's options and seed
grades the samples validation graded at step N. Grading is on rank 0. Bad input (files,
fields, grader, checkpoint) is one line on stderr and exit code 2. Docs: docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Union

from tip_megatron.apps.generate_cmd import (
    add_generation_arguments, check_inputs, generate_lines, own_ranks, torchrun_argv,
)
from tip_megatron.apps.launch import run_cli_ranks
from tip_megatron.eval.evaluate import count_prompts, grade_samples
from tip_megatron.eval.files import (
    attach_answers, check_benchmark, graded_rows, read_answers, read_samples, to_samples, write_jsonl,
)
from tip_megatron.eval.graders import get_grader
from tip_megatron.eval.metrics import summarize

logger = logging.getLogger(__name__)

BAD_INPUT = 2  # exit code


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="grade samples: mean@k / pass@k (from a samples file or a checkpoint)",
        description="Grade a samples file, or generate from a checkpoint and grade (docs/eval.md).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="JSONL written by tip-megatron generate (no model needed)")
    source.add_argument("--ckpt", help="model checkpoint, training step or run directory: "
                        "generate from --prompts, then grade")
    p.add_argument("--prompts", nargs="+", help="with --ckpt: benchmark files (prompt or messages, answer)")
    p.add_argument("--answers", nargs="+",
                   help="with --samples: prompt files to take missing answers from, joined by prompt_id")
    p.add_argument("--grader", default="math", help="registered grader: math (default), exact, regex")
    p.add_argument("--grader-option", action="append", default=[], metavar="KEY=VALUE",
                   help="grader option, repeatable (regex: pattern=...)")
    p.add_argument("--pass-k", type=int, help="k of pass@k (default: samples per prompt)")
    p.add_argument("--out", help="per-sample graded JSONL (default: beside the input, *.graded.jsonl)")
    p.add_argument("--json", help="write the summary object to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress line while grading")
    add_generation_arguments(p)
    p.set_defaults(n=16)  # the paper's mean@16


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        logger.debug("eval failed", exc_info=True)
        # Every rank says it: under torchrun the first rank to exit gets the others killed.
        print(f"tip-megatron eval: error: {err}", file=sys.stderr)
        return BAD_INPUT


def _grader_options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--grader-option {pair!r}: expected KEY=VALUE, e.g. pattern='Answer: (\\S+)'")
        out[key] = value
    return out


def _run(args: argparse.Namespace) -> int:
    options = _grader_options(args.grader_option)
    grade = get_grader(args.grader, options)  # unknown grader/option: stop before any work
    if args.pass_k is not None and args.pass_k < 1:
        raise ValueError(f"--pass-k {args.pass_k}: must be >= 1")
    if args.samples is not None:
        if args.prompts:
            raise ValueError("--prompts goes with --ckpt; with --samples, --answers names the "
                             "prompt files to take answers from")
        rows = _sample_rows(args)
        out = Path(args.out) if args.out else _beside(Path(args.samples), "")
    else:
        rows = _generated_rows(args)
        if isinstance(rows, int):
            return rows
        if rows is None:  # not rank 0: rank 0 grades
            return 0
        out = Path(args.out) if args.out else _beside(Path(args.prompts[0]), f".{Path(args.ckpt).name}")
    _grade_and_report(args, rows, grade, out)
    return 0


def _beside(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}{tag}.graded.jsonl")


def _sample_rows(args: argparse.Namespace) -> list[dict]:
    path = Path(args.samples)
    rows = read_samples(path)
    answers = None
    if args.answers and any(r.get("answer") is None for r in rows):
        answers = read_answers([Path(p) for p in args.answers], args.answer_field, args.id_field)
    attach_answers(rows, answers, path)
    return rows


def _generated_rows(args: argparse.Namespace) -> Union[list[dict], int, None]:
    """Generated rows on rank 0, None on other ranks; the exit code of the ranks started
    here when this process started them (they grade)."""
    from tip_megatron.data.prompts import PromptFields  # start-up time of --help (numpy, tokenizers)

    if not args.prompts:
        raise ValueError("--ckpt needs --prompts <benchmark files> (prompt or messages, and answer)")
    if args.answers:
        raise ValueError("--answers goes with --samples; with --ckpt the answers come from "
                         "the --prompts files' answer field")
    if args.pass_k is not None and args.pass_k > args.n:
        raise ValueError(f"--pass-k {args.pass_k}: must be <= --n {args.n}")
    fields = PromptFields(prompt=args.prompt_field, messages=args.messages_field,
                          answer=args.answer_field, id=args.id_field)
    check_benchmark(args.prompts, fields)
    if own_ranks(args):  # the ranks started here run this whole command, grading included
        check_inputs(args)  # a bad input: one line here, before any rank starts
        return run_cli_ranks(args.tp * args.pp, torchrun_argv(args.argv))
    return generate_lines(args)


def _grade_and_report(args: argparse.Namespace, rows: list[dict], grade, out: Path) -> None:
    samples = to_samples(rows)
    grades = grade_samples(samples, grade, progress=not args.no_progress)
    summary = summarize(count_prompts(samples, grades), args.grader, args.pass_k)
    write_jsonl(out, graded_rows(rows, grades))
    print(_table(summary, out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def _table(s, out: Path) -> str:
    rows = [("grader", s.grader), ("prompts", s.num_prompts),
            ("samples per prompt", s.samples_per_prompt),
            (f"mean@{s.samples_per_prompt}", f"{100 * s.mean_at_k:6.2f}%  ({s.num_correct} / {s.num_samples} correct)"),
            (f"pass@{s.k}", f"{100 * s.pass_at_k:6.2f}%"),
            ("unparsed", f"{s.num_unparsed} ({100 * s.num_unparsed / s.num_samples:.1f}%)"),
            ("per-sample file", str(out))]
    return "\n".join(f"{name:<20}: {value}" for name, value in rows)

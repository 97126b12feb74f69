"""Every check a run can make before a process group exists, in one function.

    checked = preflight(cfg, world_size)     # ValueError naming the key or file

`tip-megatron train` calls it in the launching process, before torchrun starts any rank;
each rank calls it again before `init_process_group` (train/trainer.py `setup`), so a
bare `torchrun -m tip_megatron.train` fails on every rank at once with no collective
needed. Nothing here imports megatron or reads weights: the config tree
(`config.validate_run`), every path, the models' architectures (`source_arch` reads only
config.json / arch.json), the tokenizer, and how they fit the layout and the lengths.

Errors are `PreflightError` (a ValueError) whose text is
`<dotted.key or file>: <what is wrong>; <what is accepted>`; `tip_megatron.apps.cli` prints
`error: <text>` as one line and exits 2.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tip_megatron.config import ModelSource, RunConfig, tensorboard_dir, validate_run
from tip_megatron.models.arch import ModelArch
from tip_megatron.checkpoint.sources import source_arch
from tip_megatron.distill.routing import route_table
from tip_megatron.distill.teacher_config import teachers_of
from tip_megatron.checkpoint.layout import COMPLETE, latest_checkpoint, resolve_step
from tip_megatron.runtime.device import default_backend
from tip_megatron.runtime.env import rank_env
from tip_megatron.train.memory_plan import format_plan, plan_memory
from tip_megatron.checkpoint.rundir import fresh_start_problem, starts_new_lineage
from tip_megatron.runtime.errors import PreflightError
from tip_megatron.train.preflight_tokenizer import check_tokenizer

logger = logging.getLogger(__name__)

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class Checked:
    """What preflight read, reused by the rank that called it (nothing is read twice)."""

    student_arch: ModelArch
    teacher_arch: ModelArch
    vocab_size: int
    """The shared TRUE vocabulary of student and teacher."""
    tokenizer: Any = None
    """The run's tokenizer (None when preflight ran with tokenizer=False)."""
    teacher_archs: tuple = ()
    """Every teacher's arch, in `teachers:` order (the first is `teacher_arch`)."""


def preflight(cfg: RunConfig, world_size: int, *, tokenizer: bool = True, records: bool = False) -> Checked:
    """Config tree, paths, architectures vs layout and lengths, tokenizer; raises ValueError.

    records: also read and tokenize every prompt record (a bad line anywhere, characters
    the tokenizer cannot encode, chat rows without a template) and check the outputs and
    the resume target in full; the launcher asks for it (the ranks build the prompt set
    again, after the model loads: a second pass there would cost them the same again)."""
    validate_run(cfg, world_size)
    check_paths(cfg)
    s_arch, t_archs, vocab = check_all_models(cfg)
    t_arch = t_archs[0]
    warn_memory_plan(cfg, world_size, s_arch, t_arch)
    tok = check_tokenizer(cfg, vocab) if tokenizer else None
    check_outputs_writable(cfg)
    check_resume_target(cfg, s_arch)
    if records and tok is not None:
        check_prompt_records(cfg, tok)
    return Checked(s_arch, t_arch, vocab, tok, tuple(t_archs))


# ------------------------------------------------------------------ paths
def check_paths(cfg: RunConfig) -> None:
    """Model directories hold what their kind needs; inputs are readable, outputs writable."""
    _check_source_files(cfg.student, "student")
    for i, teacher in enumerate(teachers_of(cfg)):
        _check_source_files(teacher, teacher_key(cfg, i))
    for i, path in enumerate(cfg.data.prompts):
        _check_prompt_file(Path(path), f"data.prompts[{i}]", cfg.data)
    if cfg.data.tokenizer and cfg.data.tokenizer != "char" and not Path(cfg.data.tokenizer).exists():
        raise PreflightError(f"data.tokenizer={cfg.data.tokenizer!r}", "no such file or directory",
                             "a tokenizer directory, a SentencePiece .model, char, or null")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not (Path(resume) / COMPLETE).is_file():
        raise PreflightError(f"checkpoint.resume={resume!r}", "not a complete training checkpoint "
                             f"(no {COMPLETE} file there)",
                             "auto, none, or a step_NNNNNN directory a run saved")
    _check_fresh_start(cfg.checkpoint)
    tb = tensorboard_dir(cfg)
    if tb:
        # lazy: the probe imports tensorboard, an optional extra
        from tip_megatron.train.metrics import tensorboard_probe

        tensorboard_probe(tb)
    for key, path in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.jsonl", cfg.logging.jsonl),
                      ("logging.tensorboard", tb)):
        if path:
            _check_writable(key, Path(path), want_dir=key != "logging.jsonl")


def _check_fresh_start(c) -> None:
    """A new lineage (resume=none, or a step of another directory) into a checkpoint.dir
    that holds steps needs checkpoint.overwrite=true (which moves them aside)."""
    if not c.dir or c.overwrite or not Path(c.dir).is_dir() or not starts_new_lineage(c.dir, c.resume):
        return
    problem = fresh_start_problem(c.dir, c.resume)
    if problem:
        raise PreflightError(*problem.split(": ", 1))


def _check_source_files(src: ModelSource, who: str) -> None:
    if src.hf:
        key, root = f"{who}.hf={src.hf!r}", Path(src.hf)
        if not (root / "config.json").is_file():
            raise PreflightError(key, "no config.json there", "an HF model directory "
                                 "(config.json + model.safetensors)")
        _read_json(root / "config.json", f"{who}.hf: {root / 'config.json'}")
        if not any((root / name).is_file() for name in HF_WEIGHTS):
            raise PreflightError(key, f"no {' or '.join(HF_WEIGHTS)} there",
                                 "an HF model directory with safetensors weights")
    if src.ckpt:
        key, root = f"{who}.ckpt={src.ckpt!r}", Path(src.ckpt)
        step = None if (root / "meta.json").is_file() else resolve_step(root)
        names = ("meta.json", "arch.json") if step is None else ("arch.json",)
        for name in names:
            where = (step or root) / name
            if not where.is_file():
                raise PreflightError(key, f"not a tip_megatron model checkpoint ({name} is missing) "
                                     "nor a training checkpoint", "a directory written by `tip-megatron "
                                     "convert hf-to-mcore`, a step_NNNNNN directory a run saved, or "
                                     "its run directory (the newest complete step)")
            _read_json(where, f"{who}.ckpt: {where}")


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PreflightError(where, f"unreadable JSON ({err})", "a JSON object") from None
    if not isinstance(data, dict):
        raise PreflightError(where, f"top level is {type(data).__name__}", "a JSON object")
    return data


def _check_prompt_file(path: Path, key: str, data) -> None:
    where = f"{key}={str(path)!r}"
    if not path.is_file():
        raise PreflightError(where, "no such file", "JSONL or parquet prompt files")
    if not os.access(path, os.R_OK):
        raise PreflightError(where, "not readable", "a file this user can read")
    if path.stat().st_size == 0:
        raise PreflightError(where, "empty file", "at least one prompt record")
    if path.suffix not in (".jsonl", ".json"):
        return  # parquet: its schema is read by the loader
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError as err:
        raise PreflightError(where, f"not UTF-8 text (byte {err.start} of a line: a binary "
                             "file?)", "JSONL text (one JSON object per line) or .parquet") from None
    try:
        record = json.loads(first)
    except ValueError:
        raise PreflightError(where, f"first line is not JSON: {first[:60]!r}",
                             "one JSON object per line") from None
    fields = (data.prompt_field, data.messages_field)
    if not isinstance(record, dict) or not any(f in record for f in fields):
        raise PreflightError(where, f"first record has none of the fields {list(fields)}",
                             "set data.prompt_field / data.messages_field to the file's field names")


def _check_writable(key: str, path: Path, want_dir: bool) -> None:
    if path.exists():
        if want_dir != path.is_dir():
            raise PreflightError(f"{key}={str(path)!r}", f"exists and is {'not ' if want_dir else ''}"
                                 "a directory", "a directory path" if want_dir else "a file path")
        return
    parent = next(p for p in path.parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise PreflightError(f"{key}={str(path)!r}", f"cannot be created ({parent} is not "
                             "writable)", "a path under a writable directory")


# ------------------------------------------------------------------ architectures
def _source_key(src: ModelSource, who: str) -> str:
    kind = next(k for k in ("ckpt", "hf", "builtin") if getattr(src, k))
    return f"{who}.{kind}={getattr(src, kind)!r}"


def _arch(src: ModelSource, who: str) -> ModelArch:
    try:
        return source_arch(src)
    except (ValueError, KeyError, OSError) as err:
        what = f"missing config field {err}" if isinstance(err, KeyError) else str(err)
        raise PreflightError(_source_key(src, who), what) from None


def check_models(cfg: RunConfig) -> tuple[ModelArch, ModelArch, int]:
    """(student arch, (first) teacher arch, shared vocabulary): `check_all_models`."""
    s_arch, t_archs, vocab = check_all_models(cfg)
    return s_arch, t_archs[0], vocab


def teacher_key(cfg: RunConfig, i: int) -> str:
    """How errors name teacher `i`: `teacher`, or `teachers[i]` (several teachers)."""
    return f"teachers[{i}]" if cfg.teachers else "teacher"


def check_all_models(cfg: RunConfig) -> tuple[ModelArch, list[ModelArch], int]:
    """(student arch, every teacher's arch, shared vocabulary): families, vocabularies, heads
    and layers vs the layout, positions vs the longest rollout. Every teacher must share the
    student's vocabulary (one line naming the teacher otherwise)."""
    from tip_megatron.ops import check_vocab_compat  # ops/ is cheap: no megatron

    student = _arch(cfg.student, "student")
    checks = [("student", "parallel", cfg.student, student, cfg.parallel)]
    vocab = None
    for i, teacher in enumerate(teachers_of(cfg)):
        who = teacher_key(cfg, i)
        arch = _arch(teacher, who)
        try:
            vocab = check_vocab_compat(student.vocab_size, arch.vocab_size, cfg.shared_vocab_size)
        except ValueError as err:
            name = f" ({teacher.name})" if cfg.teachers else ""
            raise PreflightError("shared_vocab_size" if cfg.shared_vocab_size else f"{who}{name}",
                                 str(err)) from None
        checks.append((who, f"{who}.parallel", teacher, arch, teacher.parallel.resolve(cfg.parallel)))
    for who, key, src, arch, p in checks:
        try:
            arch.validate_parallel(p.tp, p.pp, p.vpp)
        except ValueError as err:
            raise PreflightError(f"{key} (tp={p.tp}, pp={p.pp}, vpp={p.vpp})",
                                 f"the {who} ({_source_key(src, who)}) cannot be cut: {err}") from None
        check_lengths(cfg, arch, who)
    return student, [c[3] for c in checks[1:]], vocab


def check_lengths(cfg: RunConfig, arch: ModelArch, who: str) -> None:
    longest = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if longest > arch.max_position_embeddings:
        raise PreflightError(
            "data.max_prompt_len + rollout.max_new_tokens",
            f"rollouts of up to {cfg.data.max_prompt_len} + {cfg.rollout.max_new_tokens} = "
            f"{longest} tokens exceed the {who}'s max_position_embeddings="
            f"{arch.max_position_embeddings}", "lower one of them")


# ------------------------------------------------------------------ memory
def warn_memory_plan(cfg: RunConfig, world_size: int, s_arch: ModelArch, t_arch: ModelArch):
    """With `parallel.gpu_memory_gib` set: plan the run (`tip-megatron plan`'s numbers) and
    warn (rank 0) with the plan's table when a rank would exceed it; the plan, or None."""
    if cfg.parallel.gpu_memory_gib is None:
        return None
    if len(cfg.teachers) > 1:
        if rank_env().rank == 0:
            logger.warning("parallel.gpu_memory_gib=%s: not checked, the memory plan models one "
                           "teacher and this run has %d", cfg.parallel.gpu_memory_gib, len(cfg.teachers))
        return None
    device = "cuda" if default_backend().is_cuda else "cpu"
    # Every rank of the job: the plan places the teacher's own ranks (`separate`) itself.
    plan = plan_memory(cfg, s_arch, t_arch, world_size, device=device)
    if plan.fits is False and rank_env().rank == 0:
        logger.warning("parallel.gpu_memory_gib=%s: the memory plan puts a rank at %.1f GiB, above "
                       "%.1f GiB (tip-megatron plan; docs/plan.md):\n%s", cfg.parallel.gpu_memory_gib,
                       plan.max_total_mib / 1024, plan.gpu_memory_gib, format_plan(plan))
    return plan


# ------------------------------------------------------------------ what ranks found late
def check_outputs_writable(cfg: RunConfig) -> None:
    """An existing output directory (or metrics file) this user cannot write to: refused
    here, not by every rank at its first save."""
    tb = tensorboard_dir(cfg)
    for key, path in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.jsonl", cfg.logging.jsonl),
                      ("logging.tensorboard", tb)):
        if not path or not Path(path).exists():
            continue
        p = Path(path)
        mode = os.W_OK | (os.X_OK if p.is_dir() else 0)
        if not os.access(p, mode):
            raise PreflightError(f"{key}={str(p)!r}", "exists and is not writable by this user",
                                 "a path this user can write to, or a new one")


def check_resume_target(cfg: RunConfig, student: ModelArch) -> None:
    """The checkpoint a resume would load: an explicit `checkpoint.resume` step holds the
    files its manifest lists at their saved sizes (a COMPLETE marker alone is no
    checkpoint); it, or under `resume=auto` the newest step of `checkpoint.dir`, was saved
    for the student's architecture."""
    c = cfg.checkpoint
    if c.resume == "none":
        return
    if c.resume != "auto":
        target, key = Path(c.resume), f"checkpoint.resume={c.resume!r}"
        _check_manifest_sizes(target, key)
    else:
        target, key = (latest_checkpoint(c.dir) if c.dir else None), "checkpoint.resume=auto"
        if target is None:
            return
    arch_file = target / "arch.json"
    saved = _read_json(arch_file, f"{key}: {arch_file}")
    try:
        saved_arch = ModelArch.from_dict(saved)
    except (TypeError, ValueError, KeyError) as err:
        raise PreflightError(f"{key}: {arch_file}", f"not an architecture ({err})") from None
    a, b = saved_arch.to_dict(), student.to_dict()
    diffs = [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k != "extra" and a.get(k) != b.get(k)]
    if diffs:
        raise PreflightError(key, f"{target} was saved for a different student architecture "
                             f"({'; '.join(diffs[:4])})", "the student the run was started with, "
                             "or checkpoint.resume=none with a new checkpoint.dir")


def _check_manifest_sizes(step: Path, key: str) -> None:
    from tip_megatron.checkpoint.layout import MANIFEST  # the name only

    manifest = step / MANIFEST
    if not manifest.is_file():
        if not (step / "dist").is_dir() or not (step / "arch.json").is_file():
            raise PreflightError(key, f"{step} has a {COMPLETE} marker but no {MANIFEST}, dist/ "
                                 "or arch.json: not a checkpoint a run saved",
                                 "a step_NNNNNN directory a run saved")
        return
    files = _read_json(manifest, f"{key}: {manifest}").get("files")
    if not isinstance(files, dict) or not files:
        raise PreflightError(f"{key}: {manifest}", "lists no files", "the manifest a run wrote")
    for rel, entry in sorted(files.items()):
        path = step / rel
        size = path.stat().st_size if path.is_file() else None
        if size is None or size != (entry or {}).get("size"):
            what = "missing" if size is None else f"{size} bytes, {(entry or {}).get('size')} at save"
            raise PreflightError(key, f"{path}: {what}", "an intact checkpoint (resume from an older "
                                 "step, or checkpoint.resume=auto to take the newest that verifies)")


def check_prompt_records(cfg: RunConfig, tok: Any) -> None:
    """Every record of `data.prompts`, read and tokenized as the ranks will (the same
    `PromptDataset`): a bad JSON line, a prompt that is not a non-empty string, chat rows
    without a chat template, text the tokenizer cannot encode, all named by file and line."""
    if not cfg.data.prompts:
        return
    from tip_megatron.data.prompts import PromptDataset  # numpy only: no megatron

    d = cfg.data
    try:
        dataset = PromptDataset(list(d.prompts), tok, fields=d.prompt_fields(),
                                apply_chat_template=d.apply_chat_template,
                                max_prompt_len=d.max_prompt_len, overlong=d.overlong,
                                chat_template_kwargs=d.chat_template_kwargs, system_prompt=d.system_prompt)
        if d.route_field:
            route_table(teachers_of(cfg), dataset.route_where)
    except (ValueError, UnicodeDecodeError, KeyError, IndexError) as err:
        raise PreflightError("data.prompts", " ".join(str(err).split()) or type(err).__name__) from None

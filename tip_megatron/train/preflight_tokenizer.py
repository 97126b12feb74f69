"""Preflight's tokenizer checks: the run's tokenizer (`data.tokenizer`, else the student's
bundled one), the teacher's agreeing with it, its coverage of the models' vocabulary, and
a chat template where prompts are rendered through one. Errors as in preflight.py."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from tip_megatron.checkpoint.sources import builtin_model
from tip_megatron.config import ModelSource, RunConfig
from tip_megatron.distill.teacher_config import teachers_of
from tip_megatron.runtime.errors import PreflightError

logger = logging.getLogger(__name__)


def check_tokenizer(cfg: RunConfig, vocab_size: int):
    """The run's tokenizer, refused when it has ids beyond the models' shared vocabulary."""
    tok = load_run_tokenizer(cfg)
    check_vocab_coverage(tok.vocab_size, vocab_size, cfg.parallel.tp)
    if cfg.data.apply_chat_template and (cfg.data.prompts or cfg.eval.prompts):
        _check_chat_template(tok)
    return tok


def check_vocab_coverage(tokenizer_size: int, true_vocab: int, tp: int, where: str = "data.tokenizer") -> None:
    """A tokenizer with ids the models lack is refused; one with fewer ids than the models'
    TRUE vocabulary (real checkpoints pad it: Qwen's 151936 rows for ~151.7k tokens) is
    fine: sampling never draws an id >= the tokenizer's size (`GenerationConfig.vocab_limit`,
    masked as the padded rows are), so every sampled id decodes."""
    from tip_megatron.models.arch import padded_vocab_size  # cheap: no megatron

    padded = padded_vocab_size(true_vocab, tp)
    if tokenizer_size > true_vocab:
        raise PreflightError(where, f"the tokenizer has {tokenizer_size} ids but the models' true "
                             f"vocabulary is {true_vocab} (padded to {padded} rows at tp={tp}; "
                             "the padded rows are no tokens)",
                             f"a tokenizer of at most {true_vocab} ids (the models' own)")
    if tokenizer_size < true_vocab:
        logger.info("%s: %d ids, the models' true vocabulary %d (padded %d at tp=%d): ids >= %d "
                    "are never sampled", where, tokenizer_size, true_vocab, padded, tp, tokenizer_size)


def _check_chat_template(tok) -> None:
    """Prompt files rendered through the chat template: render one message now, so a
    tokenizer without a template stops here rather than on every rank at the first batch."""
    try:
        tok.apply_chat_template([{"role": "user", "content": "1+1="}])
    except ValueError as err:
        raise PreflightError("data.apply_chat_template=true", str(err).split(";")[0],
                             "a tokenizer with a chat template (tokenizer_config.json "
                             "chat_template), or data.apply_chat_template=false for plain "
                             "prompts") from None


def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer of the run (`data.tokenizer`, else the student's bundled one); a
    teacher that bundles a different one is refused."""
    # lazy: tokenizer libraries (sentencepiece, transformers) load only when one is checked
    from tip_megatron.data.tokenizers import CharTokenizer, load_tokenizer

    if cfg.data.tokenizer:
        try:
            where = cfg.data.tokenizer
            tok = CharTokenizer() if where == "char" else load_tokenizer(where)
        except (ValueError, OSError) as err:
            raise PreflightError(f"data.tokenizer={cfg.data.tokenizer!r}", str(err)) from None
        _check_override(cfg, tok, where, bundled_tokenizer(cfg.student))
    else:
        bundled = bundled_tokenizer(cfg.student)
        if bundled is None:
            raise PreflightError("data.tokenizer", "not set and the student bundles no tokenizer",
                                 "a tokenizer directory or a SentencePiece .model, or a student "
                                 "checkpoint that bundles one")
        tok, where = bundled
    for i, source in enumerate(teachers_of(cfg)):
        teacher = bundled_tokenizer(source)
        if teacher is not None and teacher[0].fingerprint() != tok.fingerprint():
            who = f"teachers[{i}] ({source.name})" if cfg.teachers else "teacher"
            raise PreflightError(
                who, f"teacher tokenizer ({teacher[1]}) differs from the run's tokenizer "
                f"({where})", "on-policy distillation needs one shared vocabulary (same token -> id map)")
    return tok


def _check_override(cfg: RunConfig, tok: Any, where: str, student: Optional[tuple[Any, str]]) -> None:
    """A `data.tokenizer` that differs from the student's bundled one is refused unless
    `data.allow_tokenizer_override=true` (then a warning)."""
    if student is None or student[0].fingerprint() == tok.fingerprint():
        return
    if not cfg.data.allow_tokenizer_override:
        raise PreflightError(
            f"data.tokenizer={where!r}", f"differs from the student's bundled tokenizer ({student[1]}): "
            "its token ids would not mean what the student learned",
            "data.tokenizer=null (the bundled one), the same tokenizer, or "
            "data.allow_tokenizer_override=true")
    logger.warning("data.tokenizer=%r differs from the student's bundled tokenizer (%s): "
                   "used anyway (data.allow_tokenizer_override=true)", where, student[1])


def bundled_tokenizer(src: ModelSource) -> Optional[tuple[Any, str]]:
    """(tokenizer, where it came from) that ships with the source, or None."""
    # lazy: tokenizer libraries (sentencepiece, transformers) load only when one is checked
    from tip_megatron.data.tokenizers import load_tokenizer

    if src.builtin:
        make = builtin_model(src.builtin).tokenizer
        return (make(), f"builtin {src.builtin}") if make else None
    path = None
    if src.hf and any((Path(src.hf) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        path = src.hf
    if src.ckpt:
        # a model checkpoint, or a training step / run directory (its model_meta/tokenizer)
        from tip_megatron.checkpoint.model import model_files

        bundled = model_files(src.ckpt).tokenizer_dir
        path = str(bundled) if bundled is not None else None
    return (load_tokenizer(path), path) if path else None

"""What a training run writes beside its checkpoints so that every step is a model source:
`<checkpoint.dir>/model_meta/` (once) and, with `checkpoint.export_hf_every`, HF exports.

    model_meta/tokenizer/       the run's tokenizer files (HF directory), when it has one
    model_meta/hf_config.json   the HF config the student started from
    model_meta/meta.json        params_dtype, padded_vocab_size, the student source
    hf/step_000010/             `tip-megatron convert mcore-to-hf` of step_000010 (the newest
                                `checkpoint.keep_last` exports are kept, like the steps)

The weights are never copied: a step's `dist/` holds the model under a model checkpoint's
keys (`models.checkpoint.model_files` reads both kinds).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from tip_megatron.runtime.atomic import WRITTEN_BY
from tip_megatron.models.state import unwrap
from tip_megatron.checkpoint import training as ckpt
from tip_megatron.checkpoint.layout import STEP_RE, step_dir
from tip_megatron.checkpoint.model import model_files

logger = logging.getLogger(__name__)



def run_tokenizer_dir(cfg) -> Optional[Path]:
    """The HF tokenizer directory the run uses (data.tokenizer, else the student's bundled
    one); None for the character tokenizer, a SentencePiece file or a built-in's."""
    if cfg.data.tokenizer == "char":
        return None
    if cfg.data.tokenizer:
        p = Path(cfg.data.tokenizer)
        return p if p.is_dir() else None
    if cfg.student.hf:
        return Path(cfg.student.hf)
    if cfg.student.ckpt:
        return model_files(cfg.student.ckpt).tokenizer_dir
    return None


def start_hf_config(cfg, arch) -> dict:
    """The HF config the student starts from: its HF directory's config.json as written,
    a training run's recorded one, else the architecture's own."""
    if cfg.student.hf and (Path(cfg.student.hf) / "config.json").is_file():
        return json.loads((Path(cfg.student.hf) / "config.json").read_text())
    if cfg.student.ckpt:
        recorded = model_files(cfg.student.ckpt).hf_config
        if recorded is not None:
            return recorded
    return arch.to_hf_config()


def after_save(run) -> None:
    """Collective, after every checkpoint save: model_meta/ once, then the HF export due."""
    c = run.cfg.checkpoint
    if run.groups.rank == 0:
        model = unwrap(run.ddp[0])
        meta = dict(format="tip_megatron.training", padded_vocab_size=int(model.vocab_size),
                    params_dtype=str(model.config.params_dtype).replace("torch.", ""),
                    source={k: v for k, v in vars(run.cfg.student).items() if v})
        ckpt.write_model_meta(c.dir, hf_config=start_hf_config(run.cfg, run.models.student_arch),
                              meta=meta, tokenizer_dir=run_tokenizer_dir(run.cfg))
        if c.export_hf_every and run.step % c.export_hf_every == 0:
            export_hf(step_dir(c.dir, run.step), Path(c.dir) / "hf" / f"step_{run.step:06d}")
            prune_hf_exports(Path(c.dir) / "hf", c.keep_last)
    dist.barrier()


def export_hf(step: Path, out: Path) -> None:
    """`tip-megatron convert mcore-to-hf` in a child process: the exporter reads through a
    private torch.distributed world of one, which this (multi-rank) process cannot host."""
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "convert", "mcore-to-hf",
           "--ckpt", str(step), "--out", str(out), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"HF export of {step} failed (exit {done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:] or ''}")
    logger.info("exported %s to %s", step, out)


def prune_hf_exports(hf_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete HF exports under `hf_root` (0: keep
    all), the rule `checkpoint.keep_last` applies to the steps. Never touched: an export
    being written (a hidden temp directory until it is complete), a directory without
    the exporter's marker (not ours). Returns the deleted paths, oldest first."""
    if keep_last <= 0 or not hf_root.is_dir():
        return []
    found = sorted((p for p in hf_root.iterdir()
                    if STEP_RE.match(p.name) and (p / WRITTEN_BY).is_file()),
                   key=lambda p: int(STEP_RE.match(p.name).group(1)))
    old = found[:-keep_last]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old

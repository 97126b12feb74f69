"""Names on disk, in one place: a run directory's step directories, their markers and the
run's model metadata. Plain paths and names: no torch, cheap for the launcher's preflight.

    <checkpoint.dir>/
        step_000010/       a training checkpoint (checkpoint/training.py); complete when
                           it holds COMPLETE (written last, after MANIFEST.json)
        model_meta/        what the run started from (tokenizer/, hf_config.json, meta.json)
        hf/step_000010/    an HF export of that step (train/export.py)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

#: A step directory's name: `step_` and the step number, zero-padded to six digits or more.
STEP_RE = re.compile(r"^step_(\d{6,})$")
#: Marker file written last into a checkpoint: a directory without it is not one.
COMPLETE = "COMPLETE"
#: Sizes and checksums of a checkpoint's files (checkpoint/manifest.py).
MANIFEST = "MANIFEST.json"
#: `<checkpoint.dir>/model_meta/`: what the run started from, written once (rank 0) so that
#: every step exports and samples on its own: tokenizer/, hf_config.json, meta.json.
MODEL_META = "model_meta"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / step_name(step)


def step_number(path: str | Path) -> Optional[int]:
    """The step of a directory named like a step directory; None otherwise."""
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    return step_number(path) is not None and (Path(path) / COMPLETE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_number)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_step(path: str | Path) -> Optional[Path]:
    """A training step directory as given, or a run directory's newest complete step;
    None when `path` is neither (a run directory with no complete step is a ValueError)."""
    p = Path(path)
    if is_complete(p):
        return p
    if not p.is_dir() or not any(step_number(c) is not None for c in p.iterdir()):
        return None
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"run directory {p} holds no complete checkpoint (step_* without "
                         f"{COMPLETE}); pass a complete step directory")
    return latest

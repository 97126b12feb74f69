"""Names on disk, in one place: a run directory's step directories, their markers and the
run's model metadata. Plain paths and names: no torch, cheap for the launcher's preflight.

    <checkpoint.dir>/
        step_000010/       a training checkpoint (checkpoint/training.py); complete when
                           it holds COMPLETE (written last, after MANIFEST.json)
        model_meta/        what the run started from (tokenizer/, hf_config.json, meta.json)
        hf/step_000010/    an HF export of that step (train/export.py)
        run.lock           the launch that owns the directory (checkpoint/rundir.py)
        lineage.json       the directory's current lineage: run id, parent run and step
        metrics.jsonl      the metrics of that lineage (train/metrics.py)
        config.yaml        the effective config of the last launch
        previous/<run_id>/ a former lineage moved aside whole (checkpoint.overwrite=true)
        branches/<run_id>-after-step_000004/
                           the steps of run <run_id> newer than step 4, moved aside when a
                           launch resumed from step 4 (checkpoint.resume=<step dir>)

Each step directory records the lineage that wrote it in its `lineage.json`.
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
#: `<checkpoint.dir>/run.lock`: JSON of the launch that owns the directory (host, pid, start).
LOCK = "run.lock"
#: `<checkpoint.dir>/lineage.json` (the directory's current lineage) and
#: `<step>/lineage.json` (the lineage that wrote that step).
LINEAGE = "lineage.json"
#: The metrics file a run writes into its directory unless `logging.jsonl` says otherwise.
METRICS = "metrics.jsonl"
#: The effective config of the last launch (train/progress.py `write_effective_config`).
CONFIG = "config.yaml"
#: HF exports of steps (`<dir>/hf/step_000010/`).
HF_EXPORTS = "hf"
#: Former lineages moved aside by `checkpoint.overwrite=true`: `<dir>/previous/<run_id>/`.
PREVIOUS = "previous"
#: Newer steps moved aside by a resume from an older step: `<dir>/branches/<name>/`.
BRANCHES = "branches"
#: What a lineage owns at the top of its directory (moved aside whole by an overwrite);
#: step directories (complete, damaged or half-written) are matched by `is_step_entry`.
LINEAGE_FILES = (LINEAGE, METRICS, CONFIG, HF_EXPORTS, MODEL_META, "token_dumps")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / step_name(step)


def step_number(path: str | Path) -> Optional[int]:
    """The step of a directory named like a step directory; None otherwise."""
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_step_entry(name: str) -> bool:
    """A step directory of any state: `step_N`, `step_N.damaged*`, `.step_N.tmp-*`."""
    return name.lstrip(".").startswith("step_")


def branch_name(run_id: str, step: int) -> str:
    """`<run_id>-after-step_000004`: the steps of `run_id` newer than `step`."""
    return f"{run_id}-after-{step_name(step)}"


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

"""Shared assets of the reliability tests: two tiny random model checkpoints (student,
teacher; tip_megatron.testing.assets), a JSONL of addition prompts, run overrides, and rank
bodies for run_distributed."""
import hashlib
import logging
from pathlib import Path

from tip_megatron.testing.assets import opd_assets, tiny_run_overrides, train_history


def make_assets(root: Path) -> Path:
    return opd_assets(root, teacher_layers=2, num_prompts=32)


def overrides(assets: Path, **extra) -> list[str]:
    """A 2-step run of 4 prompts with 4 new tokens each (the tiny run, shortened)."""
    return tiny_run_overrides(assets, **{"data.prompts_per_step": 4, "rollout.max_new_tokens": 4,
                                         "train.steps": 2, **extra})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def train_capturing(args: list[str]) -> dict:
    """Rank body: train; returns the logging rank's history, the warnings logged, and the
    error (type name and message) if training raised."""
    handler = _Records()
    logging.getLogger("tip_megatron").addHandler(handler)
    out = {"history": [], "warnings": handler.lines, "error": None}
    try:
        out["history"] = train_history(args)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the test inspects it
        out["error"] = (type(err).__name__, str(err), repr(getattr(err, "__cause__", None)))
    finally:
        logging.getLogger("tip_megatron").removeHandler(handler)
    return out


def tree_hashes(root: Path) -> dict:
    """relative path -> sha256 of every file under root (to prove nothing saved changed)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}

"""Shared assets of the reliability tests: two tiny random model checkpoints (student,
teacher), a JSONL of addition prompts, run overrides, and rank bodies for run_distributed."""
import hashlib
import json
import logging
import random
from pathlib import Path

from tip_megatron.config import load_config
from tip_megatron.testing.distributed import run_distributed


def _make_model(out, hidden, layers, seed):
    from tip_megatron import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.checkpoint import save_model_checkpoint
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch("llama", hidden_size=hidden, num_layers=layers, max_position_embeddings=64)
    g = parallel.initialize(parallel.ParallelLayout(), seed=seed)
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
    save_model_checkpoint(chunks, g, arch, out)


def make_assets(root: Path) -> Path:
    run_distributed(_make_model, 1, args=(str(root / "student"), 64, 2, 1))
    run_distributed(_make_model, 1, args=(str(root / "teacher"), 96, 2, 2))
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(32):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)}) + "\n")
    return root


def overrides(assets: Path, **extra) -> list[str]:
    base = {
        "student.ckpt": assets / "student", "teacher.ckpt": assets / "teacher",
        "data.prompts": f"[{assets / 'prompts.jsonl'}]", "data.tokenizer": "char",
        "data.prompts_per_step": 4, "data.max_prompt_len": 16,
        "rollout.max_new_tokens": 4, "selection.rule": "soft_or", "selection.rho": 0.5,
        "optim.lr": 0.003, "optim.warmup_steps": 0, "train.steps": 2, "train.micro_batch_size": 2,
        "logging.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def train_capturing(args: list[str]) -> dict:
    """Rank body: train; returns the logging rank's history, the warnings logged, and the
    error (type name and message) if training raised."""
    from tip_megatron.train.trainer import run

    handler = _Records()
    logging.getLogger("tip_megatron").addHandler(handler)
    out = {"history": [], "warnings": handler.lines, "error": None}
    try:
        out["history"] = run(load_config(None, args))
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

"""`opd_assets`: a tiny random student and teacher model checkpoint (Llamas of different
width and depth) and a JSONL of addition prompts, for trainer-level tests."""
import json
import random

import pytest

from tip_megatron import parallel
from tip_megatron.models import build_model
from tip_megatron.models.checkpoint import save_model_checkpoint
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch


def _make_model(out, hidden, layers, seed):
    """A random Llama at PyTorch-default scales (distinct entropies and KLs per token)."""
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict

    arch = tiny_arch("llama", hidden_size=hidden, num_layers=layers, max_position_embeddings=64)
    g = parallel.initialize(parallel.ParallelLayout(), seed=seed)
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
    save_model_checkpoint(chunks, g, arch, out)


@pytest.fixture(scope="session")
def opd_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_assets")
    run_distributed(_make_model, 1, args=(str(root / "student"), 64, 2, 1))
    run_distributed(_make_model, 1, args=(str(root / "teacher"), 96, 4, 2))
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)}) + "\n")
    return root

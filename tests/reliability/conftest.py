"""Fixtures of the reliability tests: a tiny student and teacher model checkpoint (random
Llamas of different size) and a JSONL of addition prompts (the character tokenizer)."""
import json
import random

import pytest

from signal_helpers import make_model


@pytest.fixture(scope="session")
def opd_assets(tmp_path_factory):
    from tip_megatron.testing.distributed import run_distributed

    root = tmp_path_factory.mktemp("opd")
    run_distributed(make_model, 1, args=(str(root / "student"), 64, 2, 1))
    run_distributed(make_model, 1, args=(str(root / "teacher"), 96, 4, 2))
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)}) + "\n")
    return root


"""Fixtures of the reliability tests: a tiny student and teacher model checkpoint (random
Llamas of different size) and a JSONL of addition prompts (the character tokenizer)."""
import pytest

from tip_megatron.testing.assets import opd_assets as make_opd_assets


@pytest.fixture(scope="session")
def opd_assets(tmp_path_factory):
    return make_opd_assets(tmp_path_factory.mktemp("opd"), teacher_layers=4)

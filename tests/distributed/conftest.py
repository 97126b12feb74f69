"""`opd_assets`: a tiny random student and teacher model checkpoint (Llamas of different
width and depth) and a JSONL of addition prompts, for trainer-level tests."""
import pytest

from tip_megatron.testing.assets import opd_assets as make_opd_assets


@pytest.fixture(scope="session")
def opd_assets(tmp_path_factory):
    return make_opd_assets(tmp_path_factory.mktemp("opd_assets"), teacher_layers=4)

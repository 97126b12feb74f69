"""train.setup.FilePrompts: the trainer's prompt source over JSONL files."""
import json
from types import SimpleNamespace

from tip_megatron.config import load_config
from tip_megatron.data.prompts import PromptDataset
from tip_megatron.data.sampler import PromptLoader
from tip_megatron.data.tokenizers import CharTokenizer
from tip_megatron.train.setup import FilePrompts


def _source(path, dp_rank, dp_size):
    cfg = load_config(None, [f"data.prompts=[{path}]", "data.prompts_per_step=4",
                             "student.builtin=x", "teacher.builtin=x", "data.seed=7"])
    return FilePrompts(cfg, CharTokenizer(), SimpleNamespace(dp_size=dp_size, dp_rank=dp_rank))


def test_batches_are_the_loaders_and_survive_an_edited_file(tmp_path):
    """The ids equal the records' of a PromptLoader with the same seed (the reference), on
    each DP rank; appending to the file mid-run used to stop the run at the next step
    (the records were read back from the file, which refuses a changed one)."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i % 3}="}) + "\n" for i in range(12)))
    sources = [_source(path, rank, 2) for rank in (0, 1)]
    refs = [PromptLoader(PromptDataset([path], CharTokenizer()), prompts_per_rank=2,
                         dp_rank=rank, dp_size=2, seed=7) for rank in (0, 1)]
    expected = [[[r.token_ids for r in next(ref)] for _ in range(5)] for ref in refs]
    path.write_text(path.read_text() + json.dumps({"prompt": "9+9="}) + "\n")
    for src, batches in zip(sources, expected):
        # 5 batches: through an epoch boundary (12 prompts = 3 global batches of 4).
        assert [src.next() for _ in range(5)] == batches
        assert src.state_dict()["epoch"] == 1 and src.state_dict()["batch_in_epoch"] == 2
    assert expected[0][0] != expected[1][0]  # the ranks hold different prompts

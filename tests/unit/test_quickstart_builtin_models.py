"""What the quickstart's built-ins hand the trainer: architectures, the task's tokenizer,
and the embedded prompt source (DP-invariant, resumable, never the hold-out)."""
import torch

from tip_megatron.checkpoint.sources import builtin_model
from tip_megatron.apps.quickstart import task
from tip_megatron.apps.quickstart.builtin_models import SyntheticPrompts


def test_tokenizer_encodes_like_the_task_and_fits_the_models():
    for name in ("quickstart-teacher", "quickstart-student", "quickstart-chain-student"):
        model = builtin_model(name)
        tok = model.tokenizer()
        a, b = torch.tensor([123, 7]), torch.tensor([459, 980])
        assert [tok.encode(f"{x:03d}+{y:03d}=") for x, y in zip(a.tolist(), b.tolist())] == \
            task.encode_prompts(a, b).tolist()
        assert model.arch.vocab_size == tok.vocab_size
        assert model.arch.max_position_embeddings >= task.SEQ_LEN


def test_synthetic_prompts_are_dp_invariant_and_resume():
    one = SyntheticPrompts(8, 0, 1, seed=5)
    halves = [SyntheticPrompts(4, r, 2, seed=5) for r in (0, 1)]
    for _ in range(3):
        batch = one.next()
        assert halves[0].next() + halves[1].next() == batch
        a, b = task.decode_prompts(torch.tensor(batch))
        assert not task.is_held_out(a, b).any()
    resumed = SyntheticPrompts(8, 0, 1, seed=5)
    resumed.load_state_dict(one.state_dict())
    assert resumed.next() == one.next()
    assert SyntheticPrompts(8, 0, 1, seed=6).next() != SyntheticPrompts(8, 0, 1, seed=5).next()

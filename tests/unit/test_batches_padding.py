"""make_microbatches(seq_multiple=tp): sequence parallelism needs a length divisible by tp.

The padded micro-batches equal the unpadded ones on the original columns; the extra
columns are in no loss (target False) and continue the position ids.
"""
import torch

from tip_megatron.train.batches import make_microbatches


def test_padding_to_a_multiple_keeps_every_original_position():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (4, 7), generator=gen)
    response = torch.zeros(4, 7, dtype=torch.bool)
    response[:, 3:] = True
    rollout_ids = torch.arange(4)
    plain = make_microbatches(ids, response, rollout_ids, 2)
    padded = make_microbatches(ids, response, rollout_ids, 2, seq_multiple=4)
    for a, b in zip(plain, padded):
        assert b.input_ids.shape == (2, 8)
        assert torch.equal(b.input_ids[:, :7], a.input_ids)
        assert torch.equal(b.position_ids[0], torch.arange(8))
        # position 6 predicted token 7 (none before padding): still out of the loss
        assert torch.equal(b.target_mask[:, :7], a.target_mask) and not b.target_mask[:, 7:].any()
    assert make_microbatches(ids, response, rollout_ids, 2, seq_multiple=7)[0].input_ids.shape == (2, 7)

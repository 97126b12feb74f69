"""models.vocab.mask_padded_vocab on 2 gloo ranks: tp_group=None means "not sharded" (the
ops' convention), a TP group of 2 shards the columns; reference: the mask built by hand."""
import torch
import torch.distributed as dist

from tip_megatron.testing.distributed import run_distributed

PADDED, VOCAB = 128, 100


def _masked_columns():
    dist.init_process_group("gloo")
    from tip_megatron.models.vocab import mask_padded_vocab

    rank = dist.get_rank()
    unsharded = mask_padded_vocab(torch.zeros(3, PADDED), VOCAB, None)
    tp = dist.new_group([0, 1])
    sharded = mask_padded_vocab(torch.zeros(3, PADDED // 2), VOCAB, tp)
    # mask_padded_vocab only reads the group's rank: without a collective on it, a rank that
    # finished first could exit while the other is still connecting the group's gloo mesh
    # ("Connection closed by peer" under load). The barrier completes both sides first.
    dist.barrier(group=tp)
    return rank, torch.isinf(unsharded[0]), torch.isinf(sharded[0])


def test_none_is_unsharded_and_a_group_shards():
    """Before: with tp_group=None every rank but 0 took its WORLD rank as the shard index
    and masked all its columns (a DP replica's loss became inf)."""
    expected = torch.arange(PADDED) >= VOCAB
    for rank, unsharded, sharded in run_distributed(_masked_columns, 2):
        assert torch.equal(unsharded, expected), rank
        half = PADDED // 2
        assert torch.equal(sharded, expected[rank * half:(rank + 1) * half]), rank

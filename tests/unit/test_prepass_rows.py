"""`distill.prepass.response_rows` lines the generation engine's packed hidden states up with
the training micro-batches, and `decode.HiddenRecorder` packs what the engines record.

Reference: a dense [rows, L, h] tensor whose entry [r, t] encodes (r, t); the packed
tensor holds, row by row, the entries at the positions that predict a response token. The
rows each micro-batch reads must be exactly its target positions' entries, in the order of
`target_mask.reshape(-1).nonzero()` (what the scoring reads), for several updates per
rollout batch, micro-batch sizes, a DP replica's slice and sequence padding.
"""
import pytest
import torch

from tip_megatron.rollout.decode import HiddenRecorder
from tip_megatron.distill.prepass import response_rows
from tip_megatron.train.batches import target_mask, update_microbatches


def _rollouts(rows=8, width=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (rows,), generator=gen)
    length = torch.randint(1, width - 3, (rows,), generator=gen)
    cols = torch.arange(width)[None, :]
    response = (cols >= prompt[:, None]) & (cols < (prompt + length)[:, None])
    ids = torch.randint(0, 50, (rows, width), generator=gen)
    return ids, response, length


def _dense(rows, width):
    """[rows, width, 2] with entry [r, t] = (r, t): what the engine's hidden state encodes."""
    r = torch.arange(rows)[:, None].expand(rows, width)
    t = torch.arange(width)[None, :].expand(rows, width)
    return torch.stack([r, t], -1).double()


@pytest.mark.parametrize("updates,mbs,seq_multiple,first_id", [(1, 2, 1, 0), (2, 2, 1, 0), (2, 1, 4, 8), (4, 2, 2, 16)])
def test_rows_are_each_microbatch_targets(updates, mbs, seq_multiple, first_id):
    ids, response, length = _rollouts()
    rows, width = ids.shape
    dense = _dense(rows, width)
    packed = dense[target_mask(response)]  # row-major over positions predicting a response token
    rollout_ids = first_id + torch.arange(rows)
    groups = update_microbatches(ids, response, rollout_ids, updates, mbs, seq_multiple=seq_multiple)
    mbs_flat = [mb for g in groups for mb in g]
    for mb, index in zip(mbs_flat, response_rows(length, mbs_flat, first_id), strict=True):
        local = mb.rollout_ids - first_id
        seq = mb.target_mask.shape[1]
        expect = _dense(rows, seq)[local].reshape(-1, 2)[mb.target_mask.reshape(-1).nonzero().squeeze(1)]
        assert torch.equal(packed[index], expect)


def test_rows_refuse_a_microbatch_that_does_not_match():
    ids, response, length = _rollouts()
    [[mb, *_]] = update_microbatches(ids, response, torch.arange(8), 1, 2)
    with pytest.raises(ValueError, match="target positions but"):
        response_rows(length + 1, [mb], 0)


def test_recorder_packs_row_major_whatever_the_recording_order():
    """Records arrive by decode step (all rows' token 0, then token 1, ...), in any slot
    order; packed: row 0's tokens 0..len-1, then row 1's; records past a row's length (a
    static engine's stopped rows) never kept."""
    lengths = torch.tensor([3, 1, 2])
    rec = HiddenRecorder(max_new_tokens=4)
    for j in range(3):
        rows = torch.tensor([2, 0, 1]) if j % 2 else torch.tensor([1, 2, 0])
        rec.record(rows, torch.full_like(rows, j), torch.stack([rows.double(), torch.full_like(rows, j).double()], 1))
    out = rec.packed(lengths)
    assert out.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0], [2, 1]]
    rec.record(torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="recorded 1 hidden states for 6"):
        rec.packed(lengths)

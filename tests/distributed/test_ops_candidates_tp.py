"""Teachability (teacher mass inside the student's top-K) and the teacher's rank of a token
at TP = 1, 2 and 4 (gloo, CPU) against a float64 reference on the whole vocabulary:
padded vocabularies (TP = 4 with a true vocab of 12 of 16 columns: rank 3 holds only
padding, whose huge logits must never count) and logits with many exact ties (integers),
which the reference breaks by the lower id."""
import pytest
import torch
import torch.distributed as dist

from tip_megatron.ops import global_top_k, vocab_parallel_rank, vocab_parallel_topk_mass
from tip_megatron.testing.distributed import run_distributed

TOKENS = 9
LAYOUTS = {1: (16, 16), 2: (16, 15), 4: (16, 12)}  # world -> (padded width, true vocab)


@pytest.fixture(scope="module", autouse=True)
def _megatron_imported_before_fork():
    import megatron.core.parallel_state  # noqa: F401


def _logits(padded: int, vocab: int, ties: bool):
    g = torch.Generator().manual_seed(3 + padded + vocab + ties)
    s, t = torch.randn(TOKENS, padded, generator=g), torch.randn(TOKENS, padded, generator=g)
    if ties:
        s = (s * 1.5).round()  # few distinct values: ties inside and across shards
    s[:, vocab:] = 1e4  # padding: would win every top-K if it were read
    t[:, vocab:] = 1e4
    ids = torch.randint(0, vocab, (TOKENS,), generator=g)
    return s, t, ids


def _reference(s, t, ids, vocab: int, k: int):
    """(top-k ids, teacher mass in them, teacher rank of ids) from the full float64 rows."""
    s, t = s[:, :vocab].double(), t[:, :vocab].double()
    p_t = torch.softmax(t, dim=1)
    top, mass, rank = [], [], []
    for i in range(s.shape[0]):
        order = sorted(range(vocab), key=lambda v: (-float(s[i, v]), v))[:k]
        top.append(order)
        mass.append(float(p_t[i, order].sum()))
        t_order = sorted(range(vocab), key=lambda v: (-float(t[i, v]), v))
        rank.append(float(t_order.index(int(ids[i]))))
    return torch.tensor(top), torch.tensor(mass, dtype=torch.float64), torch.tensor(rank, dtype=torch.float64)


def _check_all(world: int):
    dist.init_process_group("gloo")
    padded, vocab = LAYOUTS[world]
    group = dist.group.WORLD
    rank = dist.get_rank()
    width = padded // world
    cols = slice(rank * width, (rank + 1) * width)
    for ties in (False, True):
        s, t, ids = _logits(padded, vocab, ties)
        for k in (1, 3, 5, vocab):
            want_top, want_mass, want_rank = _reference(s, t, ids, vocab, k)
            kw = dict(tp_group=group, vocab_size=vocab)
            top = global_top_k(s[:, cols].clone(), k, **kw)
            assert torch.equal(top, want_top), (world, ties, k)
            mass = vocab_parallel_topk_mass(s[:, cols].clone(), t[:, cols].clone(), k, **kw)
            # the teacher's normaliser sums fp32 exponentials (float64 accumulation)
            torch.testing.assert_close(mass, want_mass, rtol=1e-6, atol=1e-7)
            got_rank = vocab_parallel_rank(t[:, cols].clone(), ids, **kw)
            assert torch.equal(got_rank, want_rank), (world, ties, k)
    # Ties in the teacher too: the rank counts equal logits with a lower id as ahead.
    t_tied = torch.zeros(2, padded)
    t_tied[:, vocab:] = 1e4
    got = vocab_parallel_rank(t_tied[:, cols].clone(), torch.tensor([0, vocab - 1]), tp_group=group,
                              vocab_size=vocab)
    assert got.tolist() == [0.0, float(vocab - 1)]
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_candidates_against_float64_reference(world):
    assert all(run_distributed(_check_all, world, args=(world,)))


def test_refusals():
    s = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="k=0"):
        global_top_k(s, 0, tp_group=None, vocab_size=8)
    with pytest.raises(ValueError, match="token_ids"):
        vocab_parallel_rank(s, torch.tensor([0, 8]), tp_group=None, vocab_size=8)

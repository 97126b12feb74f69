"""The candidate ops over several row blocks (a width of 2^17 columns: 8 tokens per block
on the CPU, 20 tokens = 3 blocks) against a float64 torch reference, ties included."""
import torch

from tip_megatron.ops import global_top_k, vocab_parallel_rank, vocab_parallel_topk_mass


def test_many_blocks_against_float64_reference():
    g = torch.Generator().manual_seed(9)
    n, w, k = 20, 1 << 17, 6
    s = torch.randn(n, w, generator=g).mul(2).round()  # many exact ties
    t = torch.randn(n, w, generator=g)
    ids = torch.randint(0, w, (n,), generator=g)
    # reference order: value descending, then lower id (stable sort of an id-ordered row)
    want_top = torch.sort(-s.double(), dim=1, stable=True).indices[:, :k]
    assert torch.equal(global_top_k(s, k, tp_group=None, vocab_size=w), want_top)
    p_t = torch.softmax(t.double(), dim=1)
    torch.testing.assert_close(vocab_parallel_topk_mass(s, t, k, tp_group=None, vocab_size=w),
                               p_t.gather(1, want_top).sum(1), rtol=1e-6, atol=1e-9)
    t_tok = t.gather(1, ids[:, None])
    cols = torch.arange(w)
    want_rank = ((t > t_tok) | ((t == t_tok) & (cols < ids[:, None]))).sum(1).double()
    assert torch.equal(vocab_parallel_rank(t, ids, tp_group=None, vocab_size=w), want_rank)

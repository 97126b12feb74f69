"""`selection.normalize`: `absolute` and `running` against numpy references, the small-batch
failure `batch` has and the others do not, the moving average's resume through its saved
tensor, and the refusals."""
import numpy as np
import pytest
import torch

from tip_megatron.testing.synthetic_signals import Rollout, pack, synthetic_rollouts
from tip_megatron.tip import SelectionConfig, compute_scores, global_norm_stats, select_global_weighted
from tip_megatron.tip.normalize import RunningNorm


def _np(sig, name):
    return getattr(sig, name).double().numpy()


def test_absolute_scores_and_selection():
    sig = pack(synthetic_rollouts(seed=3, num_rollouts=5, max_response=30))
    resp = sig.response_mask.numpy()
    h, d, f = _np(sig, "entropy_norm"), _np(sig, "reverse_kl"), _np(sig, "forward_kl")
    scores = compute_scores(sig, global_norm_stats([sig], None), "absolute")
    h_hat, d_hat = np.where(resp, np.clip(h, 0, 1), 0), np.where(resp, 1 - np.exp(-d), 0)
    np.testing.assert_allclose(scores.q3.numpy(), np.where(resp, f * (1 - h_hat), 0), rtol=1e-12)
    np.testing.assert_allclose(scores.soft_or.numpy(), h_hat + d_hat - h_hat * d_hat, rtol=1e-12)
    (kept,), _, _, _ = select_global_weighted(SelectionConfig(rule="q3", rho=0.2, normalize="absolute"),
                                              [sig], None)
    key = np.where(resp, f * (1 - h_hat), 0)
    k = int(np.floor(0.2 * resp.sum()))
    want = np.zeros_like(resp)
    want[sorted(np.flatnonzero(resp), key=lambda i: (-key[i], i))[:k]] = True
    np.testing.assert_array_equal(kept.numpy(), want)


def test_small_batch_top_entropy_token_can_still_be_q3():
    """The batch's highest-entropy token gets h^ = 1 under `batch` and a Q3 score of 0 however
    wrong it is; under `absolute` its (moderate) entropy leaves it the top Q3 score."""
    h = np.array([0.10, 0.02, 0.03, 0.01, 0.02] * 4)
    f = np.full(20, 0.1)
    f[0] = 5.0  # token 0: highest entropy AND by far the largest forward KL
    sig = pack([Rollout(0, 1, h, np.full(20, 0.3), f)])
    for normalize, kept_first in (("batch", False), ("absolute", True)):
        config = SelectionConfig(rule="q3", rho=0.1, normalize=normalize)
        (kept,), _, _, _ = select_global_weighted(config, [sig], None)
        assert bool(kept[1]) is kept_first, normalize  # index 1: token 0 after one prompt token


def _batch_stats(sig):
    resp = sig.response_mask.numpy()
    h, d = _np(sig, "entropy_norm")[resp], _np(sig, "reverse_kl")[resp]
    return np.array([np.percentile(h, 98), h.min(), d.min(), d.max()])


def test_running_average_and_resume():
    steps = [pack(synthetic_rollouts(seed=s, num_rollouts=3, max_response=20, first_id=10 * s))
             for s in range(5)]
    config = SelectionConfig(rule="soft_or", rho=0.25, scope="global", normalize="running",
                             normalize_decay=0.7)
    ema, straight, state = None, [], None
    for t, sig in enumerate(steps):
        now = _batch_stats(sig)
        ema = now if ema is None else 0.7 * ema + 0.3 * now
        (kept,), _, stats, state = select_global_weighted(config, [sig], None, step=t, running=state)
        got = [float(stats.entropy_clip[0]), float(stats.entropy_min[0]),
               float(stats.div_min[0]), float(stats.div_max[0])]
        np.testing.assert_allclose(got, ema, rtol=1e-12)
        assert state.steps == t + 1
        straight.append(kept)
    # resume after step 2 from the saved [5] tensor: the same masks and the same average
    state = None
    for t, sig in enumerate(steps):
        if t == 2:
            state = RunningNorm.from_tensor(torch.tensor(state.to_tensor().tolist()))
        (kept,), _, _, state = select_global_weighted(config, [sig], None, step=t, running=state)
        assert torch.equal(kept, straight[t]), t
    # without the state, step 2 would have started a new average: another selection
    state, differs = None, []
    for t, sig in enumerate(steps[2:], start=2):
        (kept,), _, _, state = select_global_weighted(config, [sig], None, step=t, running=state)
        differs.append(not torch.equal(kept, straight[t]))
    assert any(differs)


def test_refusals():
    with pytest.raises(ValueError, match="selection.normalize='running'.*scope='global'.*'rollout'"):
        SelectionConfig(rule="soft_or", rho=0.5, normalize="running")
    with pytest.raises(ValueError, match="selection.normalize='paper'"):
        SelectionConfig(normalize="paper")
    with pytest.raises(ValueError, match="selection.normalize_decay=1.0"):
        SelectionConfig(rule="q3", rho=0.1, normalize="running", normalize_decay=1.0)
    SelectionConfig(rule="soft_or", rho=0.5, normalize="running", scope="global")

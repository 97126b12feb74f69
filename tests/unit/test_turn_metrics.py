"""Per-turn metrics (train/turn_metrics.py) against a brute-force loop over tokens, on
synthetic multi-turn rollouts with observations and random kept masks / quadrant labels."""
import random
import types

import pytest
import torch

from tip_megatron.rollout.types import Rollouts
from tip_megatron.tip import TokenSignals
from tip_megatron.tip.quadrants import Quadrant
from tip_megatron.train.batches import make_microbatches
from tip_megatron.train.turn_metrics import turn_metrics, turn_positions

MAX_TURNS = 3


def _rollouts(seed=0, rows=6, width=24):
    """Rows: prompt, then (turn tokens, observation) segments, then padding."""
    rng = random.Random(seed)
    ids = torch.zeros(rows, width, dtype=torch.long)
    gen = torch.zeros(rows, width, dtype=torch.bool)
    turn_ids = torch.full((rows, width), -1, dtype=torch.long)
    prompt, lengths, turns = [], [], []
    for r in range(rows):
        p = rng.randint(2, 5)
        col, t = p, 0
        while t < MAX_TURNS and col < width - 2:
            n = rng.randint(1, 5)
            end = min(col + n, width)
            gen[r, col:end], turn_ids[r, col:end] = True, t
            col, t = end, t + 1
            if t < MAX_TURNS and rng.random() < 0.8:
                col = min(col + rng.randint(1, 3), width)  # an observation
            if rng.random() < 0.2:
                break
        ids[r, :col] = torch.randint(1, 50, (col,), generator=torch.Generator().manual_seed(r))
        prompt.append(p), lengths.append(col - p), turns.append(t)
    return Rollouts(token_ids=ids, response_mask=gen, logprobs=torch.zeros(rows, width),
                    prompt_lengths=torch.tensor(prompt), response_lengths=torch.tensor(lengths),
                    stopped=torch.zeros(rows, dtype=torch.bool), prompt_index=torch.arange(rows),
                    sample_index=torch.zeros(rows, dtype=torch.long), turn_ids=turn_ids,
                    num_turns=torch.tensor(turns))


def _results(mbs, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for mb in mbs:
        target = mb.target_mask.reshape(-1)
        n = target.numel()
        sig = TokenSignals(torch.rand(n, generator=g), torch.rand(n, generator=g),
                           torch.rand(n, generator=g), target,
                           mb.rollout_ids[:, None].expand_as(mb.target_mask).reshape(-1))
        labels = torch.where(target, torch.randint(1, 5, (n,), generator=g), 0)
        kept = target & (torch.rand(n, generator=g) < 0.4)
        out.append(types.SimpleNamespace(signals=sig, kept_mask=kept, labels=labels))
    return out


def _brute(out, mbs, results, offset):
    rows = {}
    for r in range(out.num_rows):  # each generated token: (turn, index in turn, turn length)
        seq = [(c, int(out.turn_ids[r, c])) for c in range(out.token_ids.shape[1]) if out.response_mask[r, c]]
        for c, t in seq:
            same = [cc for cc, tt in seq if tt == t]
            rows[(r, c)] = (t, same.index(c), len(same))
    resp = [0] * MAX_TURNS
    kept = [0] * MAX_TURNS
    q3 = [0] * MAX_TURNS
    pos = []
    for mb, res in zip(mbs, results):
        b, s = mb.input_ids.shape
        for i in range(b):
            for t in range(s):
                k = i * s + t
                if not res.signals.response_mask[k]:
                    continue
                turn, at, length = rows[(int(mb.rollout_ids[i]) - offset, t + 1)]
                resp[turn] += 1
                kept[turn] += bool(res.kept_mask[k])
                if int(res.labels[k]) == int(Quadrant.Q3):
                    q3[turn] += 1
                    pos.append(at / max(length - 1, 1))
    return resp, kept, q3, pos


def test_turn_positions():
    turn_ids = torch.tensor([[-1, 0, 0, -1, 1, 1, 1, -1, 2], [-1, -1, 0, -1, -1, 1, -1, -1, -1]])
    assert turn_positions(turn_ids).tolist() == [[-1, 0, 1, -1, 0, 1, 2, -1, 0],
                                                 [-1, -1, 0, -1, -1, 0, -1, -1, -1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_turn_metrics_equal_brute_force(seed):
    out = _rollouts(seed)
    offset = 10  # the replica's first global rollout id
    mbs = make_microbatches(out.token_ids, out.response_mask, offset + torch.arange(out.num_rows), 2)
    results = _results(mbs, seed)
    got = turn_metrics(out, mbs, results, offset, MAX_TURNS, None)
    resp, kept, q3, pos = _brute(out, mbs, results, offset)
    gen, obs = int(out.response_mask.sum()), int(out.observation_mask.sum())
    assert obs > 0 and sum(resp) == gen  # every generated token but none of the observations
    assert got["turns/per_rollout"] == pytest.approx(float(out.num_turns.float().mean()))
    assert got["turns/tokens_per_turn"] == pytest.approx(gen / int(out.num_turns.sum()))
    assert got["turns/observation_tokens_per_rollout"] == pytest.approx(obs / out.num_rows)
    for t in range(MAX_TURNS):
        if resp[t]:
            assert got[f"turns/kept_share_turn{t}"] == pytest.approx(kept[t] / resp[t])
            assert got[f"turns/q3_share_turn{t}"] == pytest.approx(q3[t] / sum(q3))
    assert got["turns/q3_position_in_turn"] == pytest.approx(sum(pos) / len(pos))

"""tools/replay_selection_norm.py on a synthetic whole-step dump where the answer is known:
the step's one still-wrong token (largest forward KL) is also its most uncertain one, so
`batch` maps it to h^ = 1 and q3 drops it; `absolute` keeps it. Kept shares against numpy
over the formula w = d_fwd (1 - h^)."""
import json
import sys
from pathlib import Path

import numpy as np

from tip_megatron.train.dump_file import TokenDump, dump_path, write_token_dump

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import replay_selection_norm as replay_tool  # noqa: E402

N, RHO = 50, 0.1


def _dump(step: int, num_response: int = N) -> TokenDump:
    rng = np.random.default_rng(step)
    h = rng.uniform(0.0, 0.1, N)
    fkl = rng.uniform(0.01, 0.1, N)
    h[7], fkl[7] = 0.3, 2.0  # partly repaired, still wrong
    return TokenDump(entropy_norm=h, reverse_kl=fkl * 0.9, forward_kl=fkl, kept=np.zeros(N, bool),
                     quadrant=np.full(N, 3), rollout_id=np.arange(N) // 5, position=np.arange(N) % 5,
                     step=step, num_response_tokens=num_response)


def test_replay_batch_drops_the_uncertain_wrong_token(tmp_path, capsys):
    for step in (1, 2):
        write_token_dump(dump_path(tmp_path, step), _dump(step))
    write_token_dump(dump_path(tmp_path, 3), _dump(3, num_response=4 * N))  # a sample: skipped
    out = tmp_path / "r.json"
    assert replay_tool.main([str(tmp_path), "--rule", "q3", "--rho", str(RHO), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["dumps"] == 2
    for row in result["rows"]:
        d = _dump(int(Path(row["dump"]).stem.split("_")[1]))
        h, fkl = d.entropy_norm.astype(np.float64), d.forward_kl.astype(np.float64)
        k = int(RHO * N)
        want_abs = np.argsort(-(fkl * (1 - h)), kind="stable")[:k]  # absolute: h^ = h
        assert row["absolute"]["kept"] == k and row["absolute"]["top_kept"]
        assert abs(row["absolute"]["fkl_share"] - fkl[want_abs].sum() / fkl.sum()) < 1e-9
        assert row["absolute"]["top_h_hat"] == d.entropy_norm[7]
        # batch: token 7 alone is above the 98th percentile -> h^ = 1, score 0, dropped
        assert row["batch"]["top_h_hat"] == 1.0 and not row["batch"]["top_kept"]
        best_others = np.sort(np.delete(fkl, 7))[-k:]  # at most the 5 largest of the rest
        assert row["batch"]["kept"] == k
        assert row["batch"]["fkl_share"] <= best_others.sum() / fkl.sum() + 1e-12
    assert result["summary"]["batch"]["top_kept"] == 0 and result["summary"]["absolute"]["top_kept"] == 2


def test_no_whole_step_dump_is_one_line(tmp_path, capsys):
    assert replay_tool.main([str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("\n") == 1

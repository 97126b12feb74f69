"""tools/bench_gpu_step.py --tiny runs end to end on the CPU (so the GPU check cannot rot)."""
import json
import sys
from pathlib import Path

from tip_megatron.testing.distributed import run_distributed

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tiny(out_dir):
    sys.path.insert(0, str(TOOLS))
    import bench_gpu_step

    bench_gpu_step.main(["--tiny", "--json", str(out_dir / "r.json"), "--md", str(out_dir / "r.md")])


def test_tiny_run_writes_every_figure(tmp_path):
    run_distributed(_tiny, 1, args=(tmp_path,))
    result = json.loads((tmp_path / "r.json").read_text())
    table = (tmp_path / "r.md").read_text()
    cfg = result["config"]
    assert result["response"] == max(cfg["responses"])  # tiny: the longest fits
    in_loss = cfg["rollouts"] * result["response"]
    rows = {(r["mode"], r["rule"]): r for r in result["memory"]}
    assert len(rows) == 8 and all(r.get("note") is None for r in rows.values())
    for (mode, rule), r in rows.items():
        # Both loss paths select the same number of tokens: floor(rho * m) per group.
        assert r["kept_tokens"] == rows[("fused", rule)]["kept_tokens"]
        assert in_loss * r["rho"] - cfg["rollouts"] <= r["kept_tokens"] <= in_loss * r["rho"]
        assert r["step_peak_above_resident_mib"] > 0 and r["step_ms"] > 0
        assert f"| {mode} | {rule} | {r['rho']} | {r['kept_tokens']} |" in table
    speed, decode = result["speed"], result["decode"]
    assert speed["tokens_per_s"] > 0 and 0 <= speed["loss_path_share"] < 1
    assert decode["rows"] == 16 and decode["tokens_per_s"] > 0

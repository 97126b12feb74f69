"""tools/bench_sampling.py runs end to end on a small draw, checks the bits of every exp
pass size against the pass over all rows, and restores the module's constant."""
import json
import sys
from pathlib import Path

from tip_megatron.ops import sampling

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_small_run_times_every_pass_size_and_restores_the_default(tmp_path):
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_sampling
    finally:
        sys.path.remove(str(TOOLS))
    default = sampling.MASS_PASS_ELEMENTS_CPU
    result = bench_sampling.main(["--rows", "6", "--vocab", "1024", "--passes", "1,4", "--reps", "2",
                                  "--json", str(tmp_path / "s.json")])
    assert sampling.MASS_PASS_ELEMENTS_CPU == default
    assert json.loads((tmp_path / "s.json").read_text()) == result
    settings = result["settings"]
    assert [s["elements"] for s in settings.values()] == [6 * 1024, 1024, 4 * 1024, default]
    assert all(s["median_ms"] > 0 and s["min_ms"] <= s["median_ms"] for s in settings.values())

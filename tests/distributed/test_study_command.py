"""`tip-megatron study` end to end: a 2-rule x 2-seed x 2-step grid on the quickstart's
built-ins writes its table (Markdown + JSON) and plots, and the table's numbers are the
per-run files' numbers (recomputed here with numpy from each run's result.json and token
dumps, not through the report code).

The cache holds seeded random weights under the real recipes' keys (as in
test_quickstart_builtins), so no pre-training runs.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tip_megatron.testing.assets import fill_quickstart_cache
from tip_megatron.testing.distributed import run_distributed

RULES = ("all", "random@0.5")
SEEDS = 2


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cache = tmp / "cache"
    run_distributed(fill_quickstart_cache, 1, args=(str(cache),))
    env = dict(os.environ, TIP_MEGATRON_CACHE=str(cache), OMP_NUM_THREADS="1")
    out = tmp / "study"
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--rules", *RULES,
                           "--seeds", str(SEEDS), "--steps", "2", "--tp", "1", "--out", str(out),
                           "data.prompts_per_step=32", "train.micro_batch_size=16"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _runs(out, label):
    return [json.loads((out / "runs" / label / f"seed_{s}" / "result.json").read_text())
            for s in range(SEEDS)]


def test_table_equals_the_per_run_files(study_dir):
    table = json.loads((study_dir / "study.json").read_text())
    md = (study_dir / "study.md").read_text()
    assert list(table) == list(RULES)
    for label in RULES:
        runs = _runs(study_dir, label)
        assert {r["train_seed"] for r in runs} == {1234, 1235}  # the seeds really differ
        for key in ("exact", "A", "B", "clean"):
            vals = np.array([r["after"][key] for r in runs], dtype=np.float64)
            assert table[label]["after"][key]["mean"] == pytest.approx(vals.mean(), abs=1e-12)
            assert table[label]["after"][key]["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
        exact = np.array([r["after"]["exact"] for r in runs])
        row = f"| {label} | {SEEDS} | {100 * exact.mean():.1f} ± {100 * exact.std(ddof=1):.1f} |"
        assert row in md, md
        loss = np.mean([r["final_loss"] for r in runs])
        metrics_loss = [[json.loads(line) for line in
                         (study_dir / "runs" / label / f"seed_{s}" / "metrics.jsonl").open()][-1]["loss"]
                        for s in range(SEEDS)]
        assert loss == pytest.approx(np.mean(metrics_loss))


def test_kept_shares_from_the_dumps(study_dir):
    table = json.loads((study_dir / "study.json").read_text())
    for label, rho in (("all", 1.0), ("random@0.5", 0.5)):
        shares = {q: [] for q in (1, 2, 3, 4)}
        overall = []
        for s in range(SEEDS):
            paths = sorted((study_dir / "runs" / label / f"seed_{s}" / "token_dumps").glob("*.npz"))
            assert paths
            dumps = [np.load(p) for p in paths]
            kept = np.concatenate([d["kept"] for d in dumps])
            quads = np.concatenate([d["quadrant"] for d in dumps])
            overall.append(kept.mean())
            for q in shares:
                if (quads == q).any():
                    shares[q].append(kept[quads == q].mean())
        for q, vals in shares.items():
            if vals:
                assert table[label]["kept"][f"Q{q}"]["mean"] == pytest.approx(np.mean(vals), abs=1e-9)
        if rho == 1.0:
            assert all(table[label]["kept"][c]["mean"] == 1.0 for c in ("A", "B", "clean"))
        else:  # random at 50% keeps about half of every planted case
            assert np.mean(overall) == pytest.approx(0.5, abs=0.05)
            for c in ("A", "B", "clean"):
                assert 0.25 < table[label]["kept"][c]["mean"] < 0.75, (c, table[label]["kept"])


def test_accuracy_curves_hold_the_mid_run_points(study_dir):
    """Before OPD at step 0, then the quickstart's evaluation every step (steps/8 < 1: every
    log step); the last point, logged in the loop, equals the after-OPD evaluation that
    runs after the loop on the same final weights."""
    table = json.loads((study_dir / "study.json").read_text())
    for label in RULES:
        for s, run in enumerate(table[label]["runs"]):
            records = [json.loads(line) for line in
                       (study_dir / "runs" / label / f"seed_{s}" / "metrics.jsonl").open()]
            mid = [[r["step"], r["eval/mean_at_k"]] for r in records if "eval/mean_at_k" in r]
            assert [m[0] for m in mid] == [1, 2]
            result = run["result"]
            assert run["accuracy"] == [[0, result["before"]["exact"]], *mid]
            assert mid[-1][1] == result["after"]["exact"]
            assert {k: records[-1][f"eval/{k}"] for k in ("A", "B", "clean")} == \
                {k: result["after"][k] for k in ("A", "B", "clean")}


def test_plots_are_non_blank_pngs(study_dir):
    from matplotlib.image import imread

    for name in ("loss", "accuracy"):
        img = imread(study_dir / "plots" / f"{name}.png")
        assert img.shape[0] == 450 and img.shape[1] == 800
        assert img[..., :3].std() > 0.05, f"{name}.png is blank"


def test_bad_rule_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--rules", "q3@2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: --rules 'q3@2': .*\n", proc.stderr), proc.stderr

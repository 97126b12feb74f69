"""`tip-megatron plot` on the metrics.jsonl of a real (tiny, CPU) training run, and the
entropy vs reverse-KL scatter from a token dump written by the dump writer.
"""
import json

import numpy as np
import pytest
import torch

from tip_megatron.apps import cli
from tip_megatron.testing.assets import opd_assets, tiny_run_overrides, train_history
from tip_megatron.testing.distributed import run_distributed

matplotlib = pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
from matplotlib.image import imread  # noqa: E402

from tip_megatron.apps.plots import curves
from tip_megatron.train import dump_file as token_dump  # noqa: E402
from tip_megatron.apps.plots.scatter import token_scatter_figure  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plotrun")
    opd_assets(root, teacher_layers=2, num_prompts=32)
    overrides = tiny_run_overrides(root, **{
        "data.prompts_per_step": 8, "train.steps": STEPS, "train.micro_batch_size": 4,
        "logging.jsonl": root / "run" / "metrics.jsonl"})
    (history,) = [h for h in run_distributed(train_history, 1, args=(overrides,)) if h]
    assert len(history) == STEPS
    return root / "run"


def _check_png(path):
    image = imread(path)
    assert image.shape[:2] == (curves.FIGSIZE_IN[1] * curves.DPI, curves.FIGSIZE_IN[0] * curves.DPI)
    pixels = image[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10, f"{path}: (nearly) a single colour"
    assert pixels.std() > 0.05, f"{path}: almost no pixel variance"
    return image


def test_plot_command_writes_learning_curves_of_a_real_run(run_dir, capsys):
    assert cli.main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr()
    written = out.out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["kept_fraction.png", "loss.png", "quadrants.png", "signals.png",
                     "throughput.png"]
    for path in written:
        _check_png(path)
    # No evaluation ran: that panel is skipped with a note, not a crash.
    assert "note: skipped eval.png: no eval/mean_at_k in the metrics" in out.err


def test_curves_draw_the_logged_values(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figures, _ = curves.curve_figures(curves.read_metrics(run_dir / "metrics.jsonl"))
    lines = {line.get_gid(): line for fig in figures.values() for ax in fig.axes for line in ax.lines}
    for key in ("loss", "kept_fraction", "q1_fraction_all", "q3_fraction_kept", "tokens_per_s"):
        assert list(lines[key].get_xdata()) == [r["step"] for r in records]
        assert list(lines[key].get_ydata()) == [r[key] for r in records], key


def test_eval_curve_only_at_the_steps_that_have_it(run_dir, tmp_path):
    records = curves.read_metrics(run_dir / "metrics.jsonl")
    for r in records[1::2]:
        r["eval/mean_at_k"] = 0.1 * r["step"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["plot", str(metrics), "--out", str(tmp_path / "p")]) == 0
    _check_png(tmp_path / "p" / "eval.png")
    fig = curves.panel_figure(next(p for p in curves.PANELS if p.name == "eval"), records)
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [r["step"] for r in records[1::2]]


def _dump(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=g) ** 3
    d = torch.rand(n, generator=g).pow(2) * 3
    labels = torch.where(h > 0.05, torch.where(d > 0.5, 1, 2), torch.where(d > 0.5, 3, 4))
    return token_dump.TokenDump(
        entropy_norm=h, reverse_kl=d, forward_kl=d * 0.9, kept=(h + d / 3) > 0.5,
        quadrant=labels, rollout_id=torch.arange(n) // 50, position=torch.arange(n) % 50,
        step=7, entropy_threshold=0.05, div_threshold_nats=0.5, num_response_tokens=10 * n)


def test_token_dump_round_trip(tmp_path):
    dump = _dump()
    path = token_dump.write_token_dump(token_dump.dump_path(tmp_path, 7), dump)
    assert path == tmp_path / "token_dumps" / "step_000007.npz"
    back = token_dump.read_token_dump(path)
    for name, dtype in token_dump.COLUMNS.items():
        assert getattr(back, name).dtype == dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(dump, name))
    assert (back.step, back.entropy_threshold, back.div_threshold_nats,
            back.num_response_tokens) == (7, 0.05, 0.5, 30000)
    assert list(tmp_path.joinpath("token_dumps").iterdir()) == [path]  # no temp file left


def test_token_dump_rejects_bad_columns():
    good = _dump(10)
    with pytest.raises(ValueError, match="columns differ in length"):
        token_dump.TokenDump(**{**good.__dict__, "position": np.arange(9)})
    with pytest.raises(ValueError, match="column kept: expected bool"):
        token_dump.TokenDump(**{**good.__dict__, "kept": np.ones(10)})
    with pytest.raises(ValueError, match="quadrant: values must be 1..4"):
        token_dump.TokenDump(**{**good.__dict__, "quadrant": np.zeros(10)})


def test_capped_sample():
    assert list(token_dump.capped_sample(5, 10, 0)) == [0, 1, 2, 3, 4]
    idx = token_dump.capped_sample(1000, 100, 3)
    assert len(set(idx.tolist())) == 100 and list(idx) == sorted(idx) and idx.max() < 1000
    np.testing.assert_array_equal(idx, token_dump.capped_sample(1000, 100, 3))


def test_scatter_from_a_written_dump(tmp_path):
    dump = _dump()
    token_dump.write_token_dump(token_dump.dump_path(tmp_path, 7), dump)
    fig = token_scatter_figure(token_dump.read_token_dump(token_dump.dump_path(tmp_path, 7)))
    ax = fig.axes[0]
    points = {c.get_gid(): c.get_offsets() for c in ax.collections}
    kept = dump.kept
    np.testing.assert_allclose(points["kept"], np.stack([dump.entropy_norm[kept], dump.reverse_kl[kept]], 1))
    np.testing.assert_allclose(points["dropped"],
                               np.stack([dump.entropy_norm[~kept], dump.reverse_kl[~kept]], 1))
    thresholds = {line.get_gid(): line for line in ax.lines}
    assert list(thresholds["entropy_threshold"].get_xdata()) == [0.05, 0.05]
    assert list(thresholds["div_threshold"].get_ydata()) == [0.5, 0.5]
    # Through the command: the dump in <run dir>/token_dumps/ becomes a PNG.
    assert cli.main(["plot", str(tmp_path)]) == 0
    image = _check_png(tmp_path / "plots" / "tokens_step_000007.png")
    rgb = image[..., :3]
    bluish = (rgb[..., 2] - rgb[..., 0] > 0.25).sum()  # kept points; dropped ones are gray
    assert bluish > 100, f"only {bluish} blue pixels: no kept points drawn"


def test_scatter_colours_a_weighted_rules_tokens_by_weight(tmp_path):
    """A dump with weights strictly between 0 and 1 (tip_soft-like: per quadrant, jittered):
    the non-dropped points carry their weights as colour values on a 0-1 colour bar, the
    corners give each quadrant's mean weight (numpy's); a mask dump keeps the two colours."""
    dump = _dump()
    q = dump.quadrant.astype(int)
    base = np.array([0.0, 0.5, 0.25, 1.0, 0.0])[q]  # Q1 0.5, Q2 0.25, Q3 1, Q4 dropped
    jitter = np.random.default_rng(0).uniform(0.8, 1.0, q.size)
    weighted = token_dump.TokenDump(**{**dump.__dict__, "kept": base > 0,
                                       "weight": (base * jitter).astype(np.float32)})
    path = token_dump.write_token_dump(token_dump.dump_path(tmp_path, 7), weighted)
    back = token_dump.read_token_dump(path)
    fig = token_scatter_figure(back)
    ax, bar = fig.axes
    assert bar.get_ylabel() == "loss weight"
    pts = {c.get_gid(): c for c in ax.collections}
    w = back.weight.astype(np.float64)
    on = w > 0
    np.testing.assert_allclose(pts["kept"].get_offsets(),
                               np.stack([back.entropy_norm[on], back.reverse_kl[on]], 1))
    np.testing.assert_allclose(pts["kept"].get_array(), w[on])
    assert pts["kept"].get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(pts["dropped"].get_offsets(),
                               np.stack([back.entropy_norm[~on], back.reverse_kl[~on]], 1))
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    for quad in (1, 2, 3, 4):
        assert texts[f"Q{quad}"].endswith(f"mean weight {w[q == quad].mean():.2f}"), texts[f"Q{quad}"]
    assert texts["Q4"].endswith("mean weight 0.00") and not texts["Q3"].endswith("1.00")
    # a mask dump of the same tokens: no colour bar, kept shares in the corners
    mask_fig = token_scatter_figure(token_dump.TokenDump(**{**weighted.__dict__,
                                                            "weight": on.astype(np.float32)}))
    (mask_ax,) = mask_fig.axes
    assert mask_ax.collections[1].get_array() is None
    assert {t.get_gid(): t.get_text() for t in mask_ax.texts}["Q3"].endswith("100% kept")
    # through the command: viridis' yellow end (Q3's weights near 1) is drawn
    assert cli.main(["plot", str(tmp_path)]) == 0
    rgb = _check_png(tmp_path / "plots" / "tokens_step_000007.png")[..., :3]
    yellow = ((rgb[..., 0] > 0.7) & (rgb[..., 1] > 0.7) & (rgb[..., 2] < 0.35)).sum()
    assert yellow > 100, f"only {yellow} yellow pixels: the weights are not the colours"


def test_without_matplotlib_one_line_naming_the_extra(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if not installed
            "from tip_megatron.apps import cli; sys.exit(cli.main(['plot', sys.argv[1]]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: tip-megatron plot needs matplotlib: install the plot extra "
        "(pip install 'tip_megatron[plot]', or bash install.sh plot)")


def test_plot_of_a_directory_without_metrics_or_dumps(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl and no token_dumps/step_*.npz" in capsys.readouterr().err

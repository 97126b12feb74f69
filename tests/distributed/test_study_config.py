"""`tip-megatron study --config X`: a 2-rule x 2-seed x 3-step grid of training runs of a
config on tiny random Llamas (as conftest's `opd_assets`, but with the character
tokenizer's 14-token vocabulary: validation decodes what the student samples),
validated every step on a small benchmark (regex grader, temperature 1).

Independent checks: each cell's final accuracy is recomputed here from its saved final
checkpoint (a fresh process loads the weights; one `generate` call with the validation's
seed and step; responses graded with `re` and averaged with numpy, not through the eval
package), and the table's mean ± std equal numpy's over those; kept shares equal numpy's
over the token dumps, and the metrics-only path (no dumps) gives the same counts; the
PNGs are 800 x 450, not blank, with curves of 3 points; a rerun keeps the finished cells.
"""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tip_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

RULES = ("all", "random@0.5")
SEEDS, STEPS, N, NEW, EVAL_SEED = 2, 3, 4, 4, 4321
PATTERN = r"^(\d)"  # the first character, when a digit


def _config(assets, tmp):
    rows = [{"prompt": f"{a:03d}+{b:03d}=", "answer": str((a + b) % 10)}
            for a, b in ((12, 7), (305, 999), (40, 40), (123, 456), (999, 1), (500, 250),
                         (87, 13), (671, 222), (3, 4), (250, 750), (111, 888), (64, 36))]
    (tmp / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "student": {"ckpt": str(assets / "student")}, "teacher": {"ckpt": str(assets / "teacher")},
        "data": {"prompts": [str(assets / "prompts.jsonl")], "tokenizer": "char",
                 "prompts_per_step": 16, "max_prompt_len": 16},
        "rollout": {"max_new_tokens": 6},
        "optim": {"lr": 0.01, "warmup_steps": 0},
        "train": {"steps": STEPS, "micro_batch_size": 4},
        "eval": {"prompts": [str(tmp / "bench.jsonl")], "n": N, "temperature": 1.0,
                 "max_new_tokens": NEW, "grader": "regex", "grader_options": {"pattern": PATTERN},
                 "batch_size": 16, "seed": EVAL_SEED},
    }
    import yaml

    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "run.yaml", rows


def _study(config, out, *extra):
    return subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "study", "--rules", *RULES,
                           "--seeds", str(SEEDS), "--config", str(config), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1800)


def _make_model(out, hidden, layers, seed):
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.checkpoint.model import save_model_checkpoint
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch("llama", hidden_size=hidden, num_layers=layers, vocab_size=14,
                     max_position_embeddings=64)
    g = parallel.initialize(parallel.ParallelLayout(), seed=seed)
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
    save_model_checkpoint(chunks, g, arch, out)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study_config")
    run_distributed(_make_model, 1, args=(str(tmp / "student"), 64, 2, 1))
    run_distributed(_make_model, 1, args=(str(tmp / "teacher"), 96, 4, 2))
    rng = random.Random(0)
    pairs = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(64)]
    (tmp / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)}) + "\n" for a, b in pairs))
    config, rows = _config(tmp, tmp)
    proc = _study(config, tmp / "study", "logging.dump_tokens_every=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "study", rows, config


def _recompute(step_dir, rows):
    """Mean@N of the weights saved in `step_dir`, sampled as the validation samples (the one
    sharded loop, eval/sharded.py: noise keyed by seed and global row at step 0, ids limited
    to the tokenizer's)."""
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.checkpoint.sources import ModelSource, load_source_weights, source_arch
    from tip_megatron.rollout.generate import GenerationConfig, generate
    from tip_megatron.data.tokenizers import CharTokenizer

    src = ModelSource(ckpt=str(step_dir))
    arch = source_arch(src)
    groups = parallel.initialize(parallel.ParallelLayout())
    chunks = build_model(arch, groups)
    load_source_weights(chunks, groups, arch, src)
    tok = CharTokenizer()
    config = GenerationConfig(n=N, max_new_tokens=NEW, temperature=1.0, stop_ids=(tok.eos_id,),
                              pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
    out = generate(chunks, groups, arch, [tok.encode(r["prompt"]) for r in rows], config,
                   seed=EVAL_SEED, step=0, row_offset=0)
    correct = []
    for row in range(out.num_rows):
        text = tok.decode(out.response(row), skip_special_tokens=True)
        found = re.findall(PATTERN, text)
        correct.append(bool(found) and found[-1] == rows[int(out.prompt_index[row])]["answer"])
    return float(np.mean(correct)), out.num_rows


def test_table_equals_recomputed_final_accuracy(study):
    out, rows, _ = study
    table = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert list(table) == list(RULES)
    finals = {}
    for label in RULES:
        accs = []
        for s in range(SEEDS):
            step = out / "runs" / label / f"seed_{s}" / "ckpt" / f"step_{STEPS:06d}"
            acc, num_rows = run_distributed(_recompute, 1, args=(step, rows))[0]
            assert num_rows == N * len(rows)
            assert table[label]["runs"][s]["final"]["mean_at_k"] == pytest.approx(acc, abs=1e-12)
            accs.append(acc)
        accs = np.array(accs)
        finals[label] = accs
        stat = table[label]["final"]["mean_at_k"]
        assert stat["mean"] == pytest.approx(accs.mean(), abs=1e-12)
        assert stat["std"] == pytest.approx(accs.std(ddof=1), abs=1e-12)
        assert f"| {label} | {SEEDS} | {100 * accs.mean():.1f} ± {100 * accs.std(ddof=1):.1f} |" in md, md
        assert {r["train_seed"] for r in table[label]["runs"]} == {1234, 1235}
    every = np.concatenate(list(finals.values()))
    assert 0 < every.max(), "a grid where nothing is ever correct tests no average"


def test_kept_shares_from_dumps_and_from_metrics(study):
    from tip_megatron.apps.study.config_report import kept_from_metrics

    out, _, _ = study
    table = json.loads((out / "study.json").read_text())
    for label in RULES:
        per_seed = {q: [] for q in (1, 2, 3, 4)}
        for s in range(SEEDS):
            run = out / "runs" / label / f"seed_{s}"
            dumps = [np.load(p) for p in sorted((run / "ckpt" / "token_dumps").glob("*.npz"))]
            assert len(dumps) == STEPS
            kept = np.concatenate([d["kept"] for d in dumps]).astype(float)
            quads = np.concatenate([d["quadrant"] for d in dumps])
            records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
            from_metrics = kept_from_metrics(records)
            for q in per_seed:
                ref = kept[quads == q].mean() if (quads == q).any() else float("nan")
                per_seed[q].append(ref)
                # every response token is dumped (below dump_tokens_max): the same counts
                assert from_metrics[f"Q{q}"] == pytest.approx(ref, abs=1e-9, nan_ok=True)
        assert table[label]["kept_source"] == "token dumps"
        for q, vals in per_seed.items():
            vals = [v for v in vals if not np.isnan(v)]
            if vals:
                assert table[label]["kept"][f"Q{q}"]["mean"] == pytest.approx(np.mean(vals), abs=1e-9)
    all_q = [table["all"]["kept"][f"Q{q}"]["mean"] for q in (1, 2, 3, 4)]
    assert all(v == 1.0 for v in all_q if not np.isnan(v))


def test_plots_have_curves(study):
    from matplotlib.image import imread

    out, _, _ = study
    table = json.loads((out / "study.json").read_text())
    for label in RULES:
        for run in table[label]["runs"]:
            assert [s for s, _ in run["accuracy"]] == list(range(1, STEPS + 1))
            assert [s for s, _ in run["loss"]] == list(range(1, STEPS + 1))
    for name in ("loss", "accuracy"):
        img = imread(out / "plots" / f"{name}.png")
        assert img.shape[:2] == (450, 800)
        assert img[..., :3].std() > 0.05, f"{name}.png is blank"


def test_rerun_keeps_finished_cells(study):
    out, _, config = study
    before = (out / "study.json").read_text()
    proc = _study(config, out, "logging.dump_tokens_every=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, kept") == len(RULES) * SEEDS, proc.stdout
    assert (out / "study.json").read_text() == before
    # another config in the same --out is refused before anything runs (one line)
    proc = _study(config, out, "logging.dump_tokens_every=1", "optim.lr=0.02")
    assert proc.returncode == 2
    assert re.fullmatch(r"error: .*seed_0: holds a run of another config .*\n", proc.stderr), proc.stderr

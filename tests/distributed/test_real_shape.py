"""The engine at a real shape (issue 26), slow tier: a teacher with exactly Qwen3-1.7B's
shape and a student with exactly Qwen3-0.6B's (random bf16 weights from transformers'
`from_config`, V = 151,936, sharded safetensors with model.safetensors.index.json) through
the whole CLI path, each stage a `python -m tip_megatron.apps.cli ...` process as a user
runs it (tip_megatron/testing/realshape.py; tools/real_shape_run.py runs the same and
records the table in docs/plan.md):

convert hf-to-mcore --tp 2 (both) -> train, 1 OPD step at TP 2 (4 rollouts of 128 new
tokens), saved -> train again: resumed from that step, step 2, saved -> generate --tp 2 ->
eval --samples -> convert mcore-to-hf -> transformers' fp32 logits of the export equal the
engine's fp32 logits of the step (TP 2) on 16 tokens, and differ from the untrained model's.

Each stage's processes are bounded (20 GiB at once: the two training ranks hold ~9 GiB each
at the optimizer step, docs/plan.md); a stage over it is killed and fails here. Wall time
13.6 minutes on the 2-core machine under load 7-20 (2026-12-06), 8.3 of them the two
training launches; ~16 GB of checkpoints are written under the test's tmp_path.
"""
import json
import math

import pytest

from tip_megatron.testing.realshape import (
    GENERATE_NEW_TOKENS, Layout, PROMPTS, QWEN3_0P6B, QWEN3_1P7B, logits_stage, real_shape_stages,
    run_stage, write_prompts,
)

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

BOUND_MIB = 20 * 1024


def _run(name, argv, log_path):
    with open(log_path, "a") as log:
        row = run_stage(name, argv, log=log, max_total_mib=BOUND_MIB)
    if row["rc"] != 0:
        tail = "".join(open(log_path).readlines()[-30:])
        pytest.fail(f"stage {name!r}: exit code {row['rc']} (killed over {BOUND_MIB} MiB: "
                    f"{row['killed_over_bound']})\n{tail}")
    return row


def test_real_shape_pair_through_the_whole_path(tmp_path):
    lay = Layout(tmp_path)
    write_prompts(tmp_path)
    log = tmp_path / "stages.log"
    rows = {name: _run(name, argv, log) for name, argv in real_shape_stages(tmp_path)}

    for hf, shape in ((lay.hf_student, QWEN3_0P6B), (lay.hf_teacher, QWEN3_1P7B)):
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        config = json.loads((hf / "config.json").read_text())
        assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")} == {
            k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}

    # two launches, one step each; the second resumed the first's checkpoint
    text = log.read_text()
    assert f"resumed from {lay.run / 'step_000001'} at step 1" in text
    steps = [json.loads(line) for line in (lay.run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["num_kept"] > 0 for s in steps if "loss" in s)
    assert (lay.run / "step_000001" / "COMPLETE").is_file() and (lay.run / "step_000002" / "COMPLETE").is_file()

    samples = [json.loads(line) for line in lay.samples.read_text().splitlines()]
    assert len(samples) == 2 * len(PROMPTS)
    for s in samples:  # sampled over 151,936 logits; ids of the 280-id tokenizer only
        assert 0 < len(s["token_ids"]) <= GENERATE_NEW_TOKENS and max(s["token_ids"]) < 280, s
    summary = json.loads(lay.eval_json.read_text())
    assert 0.0 <= summary["mean_at_k"] <= summary["pass_at_k"] <= 1.0

    assert (lay.export / "model.safetensors.index.json").is_file()
    _run("logits", logits_stage(tmp_path), log)
    logits = json.loads(lay.logits_json.read_text())
    assert logits["step"].endswith("step_000002")
    assert logits["max_abs_diff_export"] < 1e-4 * max(1.0, logits["max_abs_logit"]), logits
    assert logits["max_abs_diff_initial"] > 1e-2, logits  # two steps at lr 1e-3 moved the weights
    print(json.dumps({name: dict(wall_s=r["wall_s"], sum_anon_mib=r["sum_anon_mib"]) for name, r in rows.items()}))

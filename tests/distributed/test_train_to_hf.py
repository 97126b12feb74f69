"""A training checkpoint is a model source: train -> validate -> export -> transformers.

A TP=2 launch trains 2 steps from an imported tiny HF Qwen2 (checkpoints every step,
validation every step, an HF export at step 2), a second one trains the same 2 steps
without validation: the losses must be equal (validation touches no training RNG stream or data
cursor). One TP=1 launch loads the step directory (and the run directory, which resolves
to it) into a freshly built engine model, runs `tip-megatron generate` on it, and trains 2
steps with `student.ckpt=<run dir>`, `teacher.ckpt=<step dir>`. In the
test process: `mcore-to-hf` on the step directory; transformers' logits of the export
equal the engine's logits of the trained weights (fp32, 1e-4) and differ from the initial
model's; AutoTokenizer loads the export; `checkpoint.export_hf_every` wrote the same. The
TP=1 training saves and exports at both steps with keep_last=1: only the newest step and
export remain (an export being written and a folder of the user's untouched).

A tiny random model answers nothing right, so validation grades with a grader registered
here (forked ranks inherit it): correct iff the response has an even number of characters.
"""
import json
from functools import partial

import pytest
import torch
import torch.distributed as dist

from tip_megatron.eval import GRADERS, Grade, register_grader
from tip_megatron.testing.assets import imported_hf_model, train_history, write_jsonl
from tip_megatron.testing.distributed import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CORPUS = ["the answer is 12", "so 12+34 = 46 and 7 * 6 = 42", "what is 1/2 of 84? it is 42",
          "the quick brown fox jumps over the lazy dog"] * 8
ROWS = [{"prompt": p, "answer": a} for p, a in
        [("what is 12+34?", "46"), ("the answer is", "12"), ("half of 84", "42"),
         ("the quick brown", "fox"), ("7 * 6 =", "42"), ("so 12", "46")]]
PARITY = "_test_even_length_train"
SEQ = 16

if PARITY not in GRADERS:
    register_grader(PARITY, lambda: lambda text, answer: Grade(len(text) % 2 == 0, False, str(len(text))))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("train_to_hf")
    for name, seed in (("student", 5), ("teacher", 6)):
        imported_hf_model(work / f"hf_{name}", work / name, seed=seed, corpus=CORPUS)
    write_jsonl(work / "bench.jsonl", ROWS)
    return work


def _overrides(work, **extra):
    base = {"student.ckpt": work / "student", "teacher.ckpt": work / "teacher",
            "data.prompts": f"[{work / 'bench.jsonl'}]", "data.prompts_per_step": 4,
            "data.max_prompt_len": 16, "rollout.max_new_tokens": 6, "rollout.n": 2,
            "selection.rule": "soft_or", "selection.rho": 0.5, "optim.lr": 0.01,
            "optim.warmup_steps": 0, "train.steps": 2, "train.micro_batch_size": 2,
            "parallel.tp": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _history(results):
    (history,) = [r for r in results if r]  # the logging rank's
    return history


def _forward_step(arch, data_iterator, model):
    ids = next(data_iterator)
    output = model(ids, torch.arange(ids.shape[1])[None], None)
    return output, partial(_keep, arch)


def _keep(arch, logits):
    return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": logits[..., :arch.vocab_size].clone()}


def _engine_logits_and_generate(sources, input_ids, generate_argv, train_overrides):
    """TP=1: logits of each source (built fresh, weights from the source), generate, then
    a training run whose student and teacher are training checkpoints."""
    from tip_megatron.runtime import parallel, pipeline
    from tip_megatron.apps.cli import main
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.checkpoint.sources import ModelSource, load_source_weights, source_arch

    groups = parallel.initialize(parallel.ParallelLayout())
    logits = []
    for path in sources:
        src = ModelSource(ckpt=str(path))
        arch = source_arch(src)
        chunks = build_model(arch, groups, BuildOptions(init_weights=False))
        load_source_weights(chunks, groups, arch, src)
        with torch.no_grad():
            reports = pipeline.forward_backward(partial(_forward_step, arch), chunks, [input_ids],
                                                groups, seq_length=input_ids.shape[1],
                                                micro_batch_size=input_ids.shape[0], forward_only=True)
        logits.append(reports[0]["logits"])
    parallel.destroy()
    assert not dist.is_initialized()
    rc = main(generate_argv)
    return logits, rc, train_history(train_overrides)


def test_trained_step_exports_to_transformers_and_samples(work, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tip_megatron.apps.cli import main
    from tip_megatron.checkpoint.model import model_files
    from tip_megatron.testing.hf_models import hf_logits

    run_dir = tmp_path / "run"
    evaluated = _overrides(work, **{
        "checkpoint.dir": run_dir, "checkpoint.save_every": 1, "checkpoint.export_hf_every": 2,
        "eval.every": 1, "eval.prompts": f"[{work / 'bench.jsonl'}]", "eval.n": 3,
        "eval.max_new_tokens": 5, "eval.grader": PARITY, "eval.temperature": 1.0})
    with_eval = _history(run_distributed(train_history, 2, args=(evaluated,), timeout_s=300))
    without_eval = _history(run_distributed(train_history, 2, args=(_overrides(work),), timeout_s=300))
    assert [h["loss"] for h in with_eval] == [h["loss"] for h in without_eval]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "eval/mean_at_k" in m] == [1, 2]
    for m in logged:  # 6 prompts x 3 samples: mean@3 is a multiple of 1/18
        assert 0 <= m["eval/mean_at_k"] <= m["eval/pass_at_k"] <= 1
        assert round(18 * m["eval/mean_at_k"], 6) == int(round(18 * m["eval/mean_at_k"]))
    assert "eval/mean_at_k" not in without_eval[0]

    step = run_dir / "step_000002"
    assert model_files(run_dir).path == step  # a run directory resolves to its newest step
    input_ids = torch.randint(0, 280, (2, SEQ), generator=torch.Generator().manual_seed(0))
    samples = tmp_path / "samples.jsonl"
    gen_argv = ["generate", "--ckpt", str(step), "--prompts", str(work / "bench.jsonl"),
                "--out", str(samples), "--max-new-tokens", "4", "--greedy"]
    # student.ckpt / teacher.ckpt: a run directory and a step directory; the tokenizer is
    # the one the run recorded (no data.tokenizer)
    # ... and 2 steps of it, with an HF export at each and keep_last=1: both kinds pruned
    pruned = tmp_path / "pruned"
    (pruned / "hf" / ".step_000009.tmp-test").mkdir(parents=True)  # an export being written
    (pruned / "hf" / "step_000000").mkdir()  # a folder of the user's (no marker)
    from_steps = _overrides(work, **{"student.ckpt": run_dir, "teacher.ckpt": step,
                                     "train.steps": 2, "parallel.tp": 1, "checkpoint.dir": pruned,
                                     "checkpoint.save_every": 1, "checkpoint.export_hf_every": 1,
                                     "checkpoint.keep_last": 1})
    (engine, engine_run_dir), rc, history = run_distributed(
        _engine_logits_and_generate, 1, args=([step, run_dir], input_ids, gen_argv, from_steps),
        timeout_s=300)[0]
    assert rc == 0 and len(samples.read_text().splitlines()) == len(ROWS)
    assert torch.equal(engine, engine_run_dir)
    assert len(history) == 2 and torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert sorted(p.name for p in pruned.glob("step_*")) == ["step_000002"]
    assert sorted(p.name for p in (pruned / "hf").iterdir()) == [
        ".step_000009.tmp-test", "step_000000", "step_000002"]
    assert (pruned / "hf" / "step_000002" / "config.json").is_file()

    out = tmp_path / "hf_out"
    assert main(["convert", "mcore-to-hf", "--ckpt", str(step), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    initial = AutoModelForCausalLM.from_pretrained(work / "hf_student", torch_dtype=torch.float32).eval()
    trained_hf = hf_logits(exported, input_ids)
    assert (trained_hf - engine).abs().max().item() < 1e-4
    assert (hf_logits(initial, input_ids) - trained_hf).abs().max().item() > 1e-2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("the answer is 12") == AutoTokenizer.from_pretrained(work / "hf_student").encode(
        "the answer is 12")
    auto = AutoModelForCausalLM.from_pretrained(run_dir / "hf" / "step_000002", torch_dtype=torch.float32)
    assert torch.equal(hf_logits(auto.eval(), input_ids), trained_hf)
    assert not (run_dir / "hf" / "step_000001").exists()  # export_hf_every=2

"""Sequence parallelism: the same weights give the SP-off run's loss, kept set and every
gradient, with the fused and the unfused loss, at TP=2, TP=4 and TP2 x PP2.

Reference: the same layout with `sequence_parallel=False` in the same launch (SP-off is
itself pinned to TP=1 and to naive full-token OPD by test_distill_loss.py). Each SP run
checks that the output processor really received [s/tp, b, h] hidden states. Gradients
come from megatron DDP after finalize_model_grads (the SUM over TP of the norms' partial
gradients under SP: without it the norm gradients would be 1/tp of the truth).
Decoding an SP-built model (SP switched off for the call) equals decoding the SP-off
build, and a 2-step trainer run with SP equals the run without.
One launch per world size; each runs every body of its layouts.
"""
import contextlib

import pytest
import torch

from tip_megatron.runtime import parallel
from tip_megatron.distill import loss as loss_module
from tip_megatron.distill.spec import DistillSpec, LossConfig
from tip_megatron.distill.prepass import with_preselection
from tip_megatron.distill.step import (
    Microbatch, make_contexts, scoring_pass, teacher_hidden_states, teacher_output_weight, train_pass,
)
from tip_megatron.models import build_model
from tip_megatron.models.init import init_full_state
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.testing.assets import model_checkpoint, tiny_run_overrides, train_history
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig, select_global
from tip_megatron.train.optimizer import OptimConfig, wrap_ddp

ROWS, SEQ = 8, 12
STUDENT = tiny_arch("qwen3")  # q/k norms: their TP gradient sum must not double under SP
TEACHER = tiny_arch("llama", hidden_size=96, ffn_hidden_size=128)
SOFT_OR = SelectionConfig(rule="soft_or", rho=0.5)
GLOBAL = SelectionConfig(rule="soft_or", rho=0.5, scope="global")


def _batch():
    """8 rollouts: a prompt of 3-6 tokens, a response, right padding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, STUDENT.vocab_size, (ROWS, SEQ), generator=gen)
    target = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    for r in range(ROWS):
        target[r, 2 + r % 4:SEQ - 1 - r % 3] = True
    return Microbatch(ids, torch.arange(SEQ).expand(ROWS, SEQ).contiguous(), target, torch.arange(ROWS))


def _microbatches(num_mb):
    mb = _batch()
    fields = ("input_ids", "position_ids", "target_mask", "rollout_ids")
    return [Microbatch(*[getattr(mb, f).chunk(num_mb)[i] for f in fields]) for i in range(num_mb)]


@contextlib.contextmanager
def _spy_gathers():
    """Record the shapes the loss path gathers (the real gather still runs)."""
    shapes, real = [], loss_module.gather_sequence

    def spied(hidden, tp_group):
        shapes.append(tuple(hidden.shape))
        return real(hidden, tp_group)

    loss_module.gather_sequence = spied
    try:
        yield shapes
    finally:
        loss_module.gather_sequence = real


def _models(layout):
    g = parallel.initialize(layout, seed=0)
    student, teacher = build_model(STUDENT, g), build_model(TEACHER, g, frozen=True)
    load_full_state_dict(student, init_full_state(student, g, STUDENT, 1), g, STUDENT)
    load_full_state_dict(teacher, init_full_state(teacher, g, TEACHER, 2), g, TEACHER)
    return g, student, teacher


def _run(tp, pp, num_mb, sp, impl, selection):
    """(loss [sum, kept], kept [b*s] per micro-batch, full grads, gathered shapes)."""
    g, student, teacher = _models(parallel.ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp))
    ddp = wrap_ddp(student, g, OptimConfig(use_distributed_optimizer=False))
    mbs = _microbatches(num_mb)
    shape = dict(seq_length=SEQ, micro_batch_size=ROWS // num_mb)
    hidden = teacher_hidden_states(teacher, g, mbs, **shape)
    assert all(tuple(h.shape[:2]) == (SEQ, ROWS // num_mb) for h in hidden), "teacher not gathered"
    contexts = make_contexts(g, mbs, hidden, teacher_output_weight(teacher) if g.is_last_stage else None)
    spec = DistillSpec(selection, LossConfig(impl=impl, chunk_size=7, score_chunk_size=5),
                       STUDENT.vocab_size, g.tp_group)
    with _spy_gathers() as gathered:  # the student's gathers only (scoring and loss)
        if selection.scope == "global":
            signals = scoring_pass(ddp, g, mbs, contexts, spec, **shape).signals
            if g.is_last_stage:
                contexts = with_preselection(contexts, signals, select_global(selection, signals, g.dp_group))
        results = train_pass(ddp, g, mbs, contexts, spec, **shape)
    loss = torch.stack([r.metric_sums["distill"] for r in results]).sum(0) if results else None
    kept = [r.kept_mask for r in results]
    grads = gather_full_state_dict(ddp, g, STUDENT, tensor_of=lambda p: p.main_grad)
    return loss, kept, grads, gathered


def _compare(tp, pp, num_mb, cases):
    """Every (impl, selection) case with SP on vs off; returns the failures as text."""
    out = []
    for impl, selection in cases:
        off = _run(tp, pp, num_mb, False, impl, selection)
        on = _run(tp, pp, num_mb, True, impl, selection)
        what = f"tp{tp} pp{pp} {impl} {selection.scope}"
        if off[3]:
            out.append(f"{what}: SP off gathered {off[3]}")
        if on[0] is not None:  # last stage: check what the loss path saw and produced
            want = (SEQ // tp, ROWS // num_mb, STUDENT.hidden_size)
            passes = 2 if selection.scope == "global" else 1  # scoring pre-pass + training
            if len(on[3]) != passes * num_mb or any(s != want for s in on[3]):
                out.append(f"{what}: gathered {on[3]}, wanted {want} per micro-batch")
            if not all(torch.equal(a, b) for a, b in zip(on[1], off[1])):
                out.append(f"{what}: kept sets differ")
            if int(on[0][1]) != int(off[0][1]) or abs(float(on[0][0] - off[0][0])) > 1e-6 * float(off[0][0]):
                out.append(f"{what}: loss {on[0].tolist()} vs {off[0].tolist()}")
        for name, ref in off[2].items():
            err = (on[2][name] - ref).abs().max().item()
            if err > 1e-5 * (ref.abs().max().item() + 1e-12):
                out.append(f"{what}: grad {name} off by {err:.2e}")
    return out


CASES = [("fused", SOFT_OR), ("unfused", SOFT_OR)]


def _sp_flags(chunks) -> list[bool]:
    names = ("sequence_parallel", "reduce_scatter_embeddings")
    return [getattr(m, f) for m in chunks[0].modules() for f in names if hasattr(m, f)]


def _generation(tp):
    """Decoding an SP-built student (SP switched off inside `generate`) gives the tokens
    and log-probs of the SP-off build, for both layer implementations; the flags are back
    on afterwards, so training after a rollout still runs with SP."""
    from tip_megatron.rollout.generate import GenerationConfig, generate

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out, runs = [], {}
    for sp in (False, True):
        g, student, _ = _models(parallel.ParallelLayout(tp=tp, sequence_parallel=sp))
        before = _sp_flags(student)
        for impl in ("megatron", "functional"):
            cfg = GenerationConfig(n=2, max_new_tokens=5, layer_impl=impl)
            runs[sp, impl] = generate(student, g, STUDENT, prompts, cfg, seed=3)
        if _sp_flags(student) != before or (sp and not any(before)):
            out.append(f"generation: SP flags {before} became {_sp_flags(student)}")
    for impl in ("megatron", "functional"):
        off, on = runs[False, impl], runs[True, impl]
        if not (torch.equal(off.token_ids, on.token_ids) and torch.allclose(off.logprobs, on.logprobs)):
            out.append(f"generation ({impl}): SP build decodes differently")
    return out


def _world2():
    return _generation(2) + _compare(2, 1, 1, CASES + [("fused", GLOBAL)])


def _world4():
    return _compare(4, 1, 1, CASES) + _compare(2, 2, 4, CASES)


@pytest.mark.parametrize("world,body", [(2, _world2), (4, _world4)], ids=["tp2", "tp4_and_tp2pp2"])
def test_sequence_parallel_equals_sp_off(world, body):
    failures = [f for rank_failures in run_distributed(body, world, timeout_s=600) for f in rank_failures]
    assert not failures, "\n".join(sorted(set(failures)))


def _train_both(root):
    """Student/teacher checkpoints, then 2 OPD steps at TP=2 without and with SP."""
    model_checkpoint(f"{root}/student", 64, 2, 1)
    model_checkpoint(f"{root}/teacher", 96, 4, 2)
    return {sp: train_history(tiny_run_overrides(root, **{
        "data.prompts_per_step": 8, "rollout.max_new_tokens": 5, "train.steps": 2,
        "parallel.tp": 2, "parallel.sequence_parallel": sp})) for sp in (False, True)}


def test_trainer_with_sequence_parallel_equals_sp_off(tmp_path):
    """Rollouts (decoded with SP off inside), sequences padded to a multiple of tp, the
    TIP loss and two optimizer steps: SP gives the SP-off run's curve."""
    import json
    import random

    rng = random.Random(0)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for _ in range(32):
            a, b = rng.randint(0, 999), rng.randint(0, 99)  # odd and even prompt lengths
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    (hist,) = [h for h in run_distributed(_train_both, 2, args=(str(tmp_path),), timeout_s=600) if h[False]]
    assert len(hist[False]) == len(hist[True]) == 2
    for key in ("loss", "kept_fraction", "grad_norm", "response_len"):
        off, on = [m[key] for m in hist[False]], [m[key] for m in hist[True]]
        assert on == pytest.approx(off, rel=1e-5), key

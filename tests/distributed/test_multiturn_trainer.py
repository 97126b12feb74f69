"""OPD with multi-turn rollouts (`rollout.env`) end to end on tiny random models.

The student and teacher have a 16-id vocabulary (the character tokenizer's 14 and two the
tokenizer cannot decode), so a random model ends turns ("=" or "+") and rollouts (EOS)
often. The environment is tip_megatron.testing.envs.DigitEnv (deterministic: the prompt's
answer digits, rotated by the turn index).

- Masks, against a brute-force reference: the observation tokens are found again by
  replaying the environment over each transcript (independently of the engine's masks),
  and a plain-PyTorch OPD loop (tests/distributed/test_opd_reference_loop.py) trained on
  the recorded rollouts with THAT mask gives the engine's losses with Q3 at rho 0.2 (kept
  counts, rho's denominator and the quadrant statistics see only generated tokens) and
  with every token.
- Layouts: TP2 and DP2 give TP1's losses; a resumed run gives the uninterrupted one's.
"""
import re

import pytest
import torch

from tip_megatron.config import load_config
from tip_megatron.testing.assets import addition_prompts, model_checkpoint, tiny_run_overrides
from tip_megatron.testing.assets import train_history as _train
from tip_megatron.testing.distributed import run_distributed

PLUS, EQUALS, EOS = 10, 11, 12
MAX_TURNS = 3
ENV = {"rollout.env": "tip_megatron.testing.envs:DigitEnv", "rollout.turn_stop": '["=", "+"]',
       "rollout.max_turns": MAX_TURNS, "rollout.max_new_tokens": 16, "data.prompts_per_step": 8}


def _models(root):
    model_checkpoint(f"{root}/student", 64, 2, 1, vocab_size=16)
    model_checkpoint(f"{root}/teacher", 96, 4, 2, vocab_size=16)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    run_distributed(_models, 1, args=(str(root),), env={"TIP_MEGATRON_DEVICE": "cpu"})
    addition_prompts(root / "prompts.jsonl", 32)
    return root


def _overrides(assets, **extra):
    return tiny_run_overrides(assets, **{**ENV, **extra})


def reference_mask(ids, prompt_len, end, answer):
    """[L] bool generated tokens of one transcript, found by replaying DigitEnv: after a
    turn that ends with '=' or '+', the environment's text follows."""
    mask = torch.zeros(len(ids), dtype=torch.bool)
    p, turn = prompt_len, 0
    while p < end:
        tok = int(ids[p])
        mask[p] = True
        p += 1
        if tok == EOS or tok not in (PLUS, EQUALS):
            continue
        if turn + 1 >= MAX_TURNS:
            break
        k = turn % len(answer)
        obs = [int(c) for c in answer[k:] + answer[:k]]
        got = [int(t) for t in ids[p:min(p + len(obs), end)]]
        assert got == obs[:len(got)], (got, obs)
        p += len(obs)
        if int(answer) % 2 == 1 and turn >= 1:
            break
        turn += 1
    assert p >= end
    return mask


def _engine_and_plain(overrides, rho, steps):
    import tests.distributed.test_opd_reference_loop as ref
    from tip_megatron.models import build_model
    from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
    from tip_megatron.train import trainer

    ref.STEPS = steps  # its learning-rate schedule
    run = trainer.setup(load_config(None, overrides))
    g, m = run.groups, run.models
    start = gather_full_state_dict(run.ddp, g, m.student_arch)
    teacher_state = gather_full_state_dict(m.teacher, g, m.teacher_arch)
    recorded, real = [], trainer.generate_rollouts

    def recording(run_, prompts):  # the real generation; the mask is rebuilt independently
        out = real(run_, prompts)
        answers = [r.answer for r in run_.prompts.records()]
        mask = torch.zeros_like(out.response_mask)
        for row in range(out.num_rows):
            end = int(out.prompt_lengths[row] + out.response_lengths[row])
            mask[row] = reference_mask(out.token_ids[row], int(out.prompt_lengths[row]), end,
                                       answers[row // run_.cfg.rollout.n])
        recorded.append((out.token_ids.clone(), mask, out.response_mask.clone(),
                         out.observation_mask.clone()))
        return out

    trainer.generate_rollouts = recording
    trainer.loop(run)
    engine = [(h["loss"], h) for h in run.history]
    (student,), (teacher,) = build_model(m.student_arch, g), build_model(m.teacher_arch, g, frozen=True)
    load_full_state_dict([student], start, g, m.student_arch)
    load_full_state_dict([teacher], teacher_state, g, m.teacher_arch)
    plain = ref._reference_loop(student, teacher, [(t, mk) for t, mk, _, _ in recorded], m.vocab_size, rho)
    return engine, plain, recorded


@pytest.mark.parametrize("rule,rho", [("all", 1.0), ("q3", 0.2)])
def test_observations_are_context_only_plain_loop_reference(assets, rule, rho):
    import tests.distributed.test_opd_reference_loop as ref

    steps = 4
    overrides = _overrides(assets, **{
        "selection.rule": rule, "selection.rho": rho, "train.steps": steps, "optim.lr": ref.LR,
        "optim.min_lr": ref.MIN_LR, "optim.warmup_steps": ref.WARMUP,
        "optim.weight_decay": ref.WD, "optim.clip_grad": ref.CLIP})
    engine, plain, recorded = run_distributed(_engine_and_plain, 1, args=(overrides, rho, steps),
                                              timeout_s=600)[0]
    for _, mask, engine_mask, obs in recorded:
        assert torch.equal(mask, engine_mask)  # the engine's response mask = the replayed one
        assert not bool((obs & mask).any())
    assert sum(int(o.sum()) for *_, o in recorded) > 20  # observations are there to exclude
    losses = [loss for loss, _ in engine]
    assert losses == pytest.approx(plain, rel=2e-5), list(zip(losses, plain))
    hist = engine[0][1]
    assert hist["turns/per_rollout"] > 1.2 and hist["turns/observation_tokens_per_rollout"] > 0
    gen = sum(int(m.sum()) for _, m, _, _ in recorded[:1])
    assert hist["response_len"] == pytest.approx(gen / recorded[0][0].shape[0])  # tokens/s too
    if rule == "q3" and "turns/q3_position_in_turn" in hist:
        kept = sum(hist[f"turns/q3_share_turn{t}"] for t in range(MAX_TURNS) if f"turns/q3_share_turn{t}" in hist)
        assert kept == pytest.approx(1.0)


def _losses(results):
    hist = [h for h in results if h]
    assert len(hist) == 1, "exactly one rank logs"
    return [m["loss"] for m in hist[0]], hist[0]


def test_layouts_agree_and_resume_is_exact(assets, tmp_path):
    ref, hist = _losses(run_distributed(_train, 1, args=(_overrides(assets),)))  # 3 steps
    assert all(torch.isfinite(torch.tensor(ref)))
    assert hist[0]["turns/per_rollout"] > 1.2, hist[0]
    # TP2, DP2, then the teacher on a rank of its own (interleaved rows cross the link)
    for world, extra in ((2, {"parallel.tp": 2}), (2, {}), (2, {"teacher.placement": "separate"})):
        losses, _ = _losses(run_distributed(_train, world, args=(_overrides(assets, **extra),)))
        assert losses == pytest.approx(ref, rel=1e-5), (extra, losses, ref)
    # Resume: environments are rebuilt from the records of the resumed batch.
    ckdir = tmp_path / "ck"
    first, _ = _losses(run_distributed(_train, 1, args=(_overrides(
        assets, **{"train.exit_after_steps": 2, "checkpoint.dir": ckdir}),)))
    rest, _ = _losses(run_distributed(_train, 1, args=(_overrides(assets, **{"checkpoint.dir": ckdir}),)))
    assert first + rest == ref, (first, rest, ref)


def _train_error(overrides):
    from tip_megatron.train.trainer import run

    try:
        run(load_config(None, overrides))
    except ValueError as err:  # the CLI prints a ValueError as one line, exit code 2
        return type(err).__name__, str(err)
    return None


def test_environment_fault_names_environment_prompt_file_line_and_turn(assets):
    kind, message = run_distributed(_train_error, 1, args=(_overrides(
        assets, **{"rollout.env_args": "{fault: raise}"}),))[0]
    assert kind == "EnvironmentFailed"
    assert re.match(rf"environment tip_megatron\.testing\.envs:DigitEnv at prompt "
                    rf"{re.escape(str(assets / 'prompts.jsonl'))}, line \d+ \(row \d+\), turn 0 raised "
                    r"RuntimeError: tool crashed$", message), message


def test_generation_prepass_equals_recompute_with_environment(assets):
    """`selection.prepass_source=generation` scores the hidden states the engine kept while
    generating (a turn's first token: the last observation position): the same losses and
    kept counts as the recomputing pre-pass (q3 at rho 0.2, global scope)."""
    keys = {"selection.rule": "q3", "selection.rho": 0.2, "selection.scope": "global"}
    out = {}
    for src in ("recompute", "generation"):
        losses, hist = _losses(run_distributed(_train, 1, args=(_overrides(
            assets, **keys, **{"selection.prepass_source": src}),)))
        out[src] = (losses, [h["num_kept"] for h in hist])
    assert out["generation"][1] == out["recompute"][1]
    assert out["generation"][0] == pytest.approx(out["recompute"][0], rel=1e-5, abs=1e-7)

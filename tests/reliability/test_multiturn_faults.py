"""Faulty environments of multi-turn rollouts (tip_megatron.testing.envs.ScriptedEnv's
fault modes): one error naming the environment, the prompt (file and line) and the turn,
on EVERY rank of the model-parallel group (the environment runs on one, its error travels
with the broadcast: no rank is left waiting), or the documented truncation; never a hang.
"""
import re

import pytest
import torch

from tip_megatron.testing.distributed import run_distributed

PROMPTS = [[5, 6, 7], [8, 9]]
TURN_STOP = tuple(f"<{i}>" for i in range(0, 250, 2))  # half the ids: the first turn is short
ENV = "tip_megatron.testing.envs:ScriptedEnv"


def _generate(tp, env_args, timeout_s=5.0, env=ENV, new=12, engine="dynamic", full=False):
    from tip_megatron.data.sources import PromptRecord
    from tip_megatron.models import build_model
    from tip_megatron.rollout.generate import Episodes, GenerationConfig, generate
    from tip_megatron.runtime import parallel
    from tip_megatron.testing.envs import IdTokenizer
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch()
    g = parallel.initialize(parallel.ParallelLayout(tp=tp), seed=3)
    chunks = build_model(arch, g)
    records = [PromptRecord(str(i), p, None, "", where=f"tasks.jsonl, line {i + 1}")
               for i, p in enumerate(PROMPTS)]
    config = GenerationConfig(max_new_tokens=new, temperature=0.0, env=env, env_args=env_args,
                              max_turns=3, turn_stop=TURN_STOP, env_timeout_s=timeout_s, engine=engine)
    try:
        out = generate(chunks, g, arch, PROMPTS, config, seed=1,
                       episodes=Episodes(records, IdTokenizer(250)))
    except ValueError as err:
        return type(err).__name__, str(err)
    if full:
        return out
    return out.stats, out.response_lengths.tolist(), int(out.observation_mask.sum())


@pytest.mark.parametrize("fault,expect", [
    ("raise", "raised RuntimeError: tool crashed"),
    ("hang", "no answer within rollout.env_timeout_s=1"),
    ("nontext", "step returned list; accepted: an Observation(text: str, done: bool), a str, or None"),
])
def test_fault_is_one_error_naming_environment_prompt_and_turn_on_every_rank(fault, expect):
    per_rank = run_distributed(_generate, 2, args=(2, {"fault": fault, "fault_turn": 0}, 1.0),
                               timeout_s=300)
    head = re.compile(rf"environment {ENV} at prompt tasks\.jsonl, line (\d) \(row (\d)\), turn 0")
    for kind, message in per_rank:
        assert kind == "EnvironmentFailed", message
        at = head.match(message)
        assert at and int(at[1]) == int(at[2]) + 1 and expect in message, message
        assert "\n" not in message
    assert per_rank[0] == per_rank[1]


def test_bad_factory_and_factory_that_raises():
    kind, message = run_distributed(_generate, 1, args=(1, {}, 5.0, "tip_megatron.testing.envs:Nope"))[0]
    assert kind == "EnvironmentFailed" and "rollout.env='tip_megatron.testing.envs:Nope': cannot be imported" in message
    kind, message = run_distributed(_generate, 1, args=(1, {"bogus": 1}))[0]
    assert kind == "EnvironmentFailed", message
    assert message.startswith(f"environment {ENV} at prompt tasks.jsonl, line 1 (row 0): building it "
                              "raised TypeError"), message


def test_observation_over_the_budget_is_cut_and_ends_the_rollout():
    stats, lengths, observed = run_distributed(_generate, 1, args=(1, {"fault": "huge"}))[0]
    assert stats["truncated_observations"] == 2  # both rows: their first observation
    assert lengths == [12, 12] and observed > 0


def test_none_ends_the_rollout_and_an_empty_observation_continues_it():
    """None at turn 0: each row ends with its first turn (nothing appended). An empty
    observation at turn 0: the turn counts, nothing is appended, generation goes on. Both
    engines alike."""
    for fault in ("none", "empty"):
        dyn, static = (run_distributed(_generate, 1, args=(1, {"fault": fault}, 5.0, ENV, 12, e, True))[0]
                       for e in ("dynamic", "static"))
        assert torch.equal(dyn.token_ids, static.token_ids) and torch.equal(dyn.num_turns, static.num_turns)
        ended = dyn.num_turns >= 1
        if fault == "none":
            assert dyn.num_turns.tolist() == [1, 1] and int(dyn.observation_mask.sum()) == 0
            assert dyn.stats["env_calls"] == 2 and int(dyn.response_lengths.max()) < 12
        else:
            assert int(dyn.num_turns.min()) >= 2 and bool(ended.all())
            assert torch.equal(dyn.response_mask.sum(1) + dyn.observation_mask.sum(1), dyn.response_lengths)

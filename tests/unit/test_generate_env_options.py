"""`tip-megatron generate` / `eval --ckpt` multi-turn options: --env and its keys reach the
sampling config as the run config's `rollout.env*` keys do (the sampling itself, through
the one sharded loop, is tested against a plain agent loop in
tests/distributed/test_quickstart_tools.py); without --env the config is one-turn; a bad
value stops with one line naming the key."""
import argparse

import pytest

from tip_megatron.apps import generate_cmd
from tip_megatron.apps.quickstart import tools_task


def _args(*argv):
    p = argparse.ArgumentParser()
    generate_cmd.add_generation_arguments(p)
    return p.parse_args(list(argv))


def test_env_options_reach_the_generation_config():
    tok = tools_task.tokenizer()
    args = _args("--env", tools_task.ENV_PATH, "--env-args", '{"x": 1}', "--max-turns", "3",
                 "--turn-stop", "?", "</call>", "--env-timeout-s", "5", "--max-new-tokens", "14")
    cfg = generate_cmd._config(args, tok)
    assert cfg.multi_turn and cfg.env == tools_task.ENV_PATH and cfg.env_args == {"x": 1}
    assert cfg.max_turns == 3 and cfg.turn_stop == ("?", "</call>") and cfg.env_timeout_s == 5.0
    assert cfg.observation_format == "text" and cfg.max_new_tokens == 14


def test_without_env_one_turn():
    cfg = generate_cmd._config(_args("--turn-stop", "?"), tools_task.tokenizer())
    assert not cfg.multi_turn and cfg.env is None


def test_env_without_turn_stop_is_one_line():
    with pytest.raises(ValueError, match=r"^turn_stop=\[\]: with env, a list of one or more"):
        generate_cmd._config(_args("--env", tools_task.ENV_PATH), tools_task.tokenizer())


def test_validation_of_a_multi_turn_run_samples_through_its_environment():
    from tip_megatron.config import EvalConfig, SamplingConfig
    from tip_megatron.train.validation import ValidationSpec

    rollout = SamplingConfig(env=tools_task.ENV_PATH, max_turns=3, turn_stop=("?",), env_timeout_s=7.0)
    spec = ValidationSpec.from_config(EvalConfig(max_new_tokens=14), rollout)
    assert spec.multi_turn == dict(env=tools_task.ENV_PATH, env_args={}, max_turns=3,
                                   turn_stop=("?",), observation_format="text", env_timeout_s=7.0)
    assert spec.max_new_tokens == 14
    assert ValidationSpec.from_config(EvalConfig(), SamplingConfig()).multi_turn == {}

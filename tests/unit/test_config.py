"""The run config: YAML + overrides, errors naming the key, and a frozen key set."""
from pathlib import Path

import pytest

from tip_megatron.config import (
    RunConfig, config_keys, config_to_dict, dump_config, from_dict, load_config, run_selection,
    validate_run,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))

#: Every option of the run config. A new option must be added here on purpose (with its
#: docstring in tip_megatron/config.py and a line in the docs).
FROZEN_KEYS = [
    "student.ckpt",
    "student.hf",
    "student.builtin",
    "teacher.ckpt",
    "teacher.hf",
    "teacher.builtin",
    "teacher.parallel.tp",
    "teacher.parallel.pp",
    "teacher.parallel.vpp",
    "teacher.parallel.sequence_parallel",
    "teacher.parallel.dp",
    "teacher.placement",
    "teacher.queue_depth",
    "teacher.signal",
    "teacher.topk",
    "teacher.topk_tail",
    "teacher.name",
    "teacher.serves",
    "teacher.default",
    "teachers",
    "shared_vocab_size",
    "model.spec",
    "model.dtype",
    "model.fp8",
    "model.teacher_fp8",
    "model.fp8_recipe",
    "model.fp8_amax_history_len",
    "model.fp8_amax_compute_algo",
    "model.recompute_granularity",
    "parallel.tp",
    "parallel.pp",
    "parallel.vpp",
    "parallel.sequence_parallel",
    "parallel.cp",
    "parallel.gpu_memory_gib",
    "data.prompts",
    "data.tokenizer",
    "data.prompt_field",
    "data.messages_field",
    "data.answer_field",
    "data.apply_chat_template",
    "data.chat_template_kwargs",
    "data.system_prompt",
    "data.max_prompt_len",
    "data.overlong",
    "data.prompts_per_step",
    "data.seed",
    "data.route_field",
    "data.allow_tokenizer_override",
    "rollout.n",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.env",
    "rollout.env_args",
    "rollout.max_turns",
    "rollout.turn_stop",
    "rollout.observation_format",
    "rollout.env_timeout_s",
    "selection.rule",
    "selection.rho",
    "selection.seed",
    "selection.scope",
    "selection.min_keep",
    "selection.rescore_each_update",
    "selection.prepass_source",
    "selection.quadrant_rule.kind",
    "selection.quadrant_rule.entropy_threshold",
    "selection.quadrant_rule.div_threshold_nats",
    "selection.quadrant_rule.entropy_quantile",
    "selection.quadrant_rule.div_quantile",
    "selection.keep_quadrants",
    "selection.top_k",
    "selection.threshold",
    "selection.verify_top_k",
    "selection.reject_weight",
    "selection.quadrant_weights",
    "selection.normalize",
    "selection.normalize_decay",
    "selection.budget_per_teacher",
    "loss.impl",
    "loss.chunk_size",
    "loss.score_chunk_size",
    "loss.divergence",
    "loss.jsd_beta",
    "loss.mix",
    "loss.mix_signal",
    "loss.mix_threshold",
    "loss.mix_low",
    "loss.mix_high",
    "loss.one_pass",
    "optim.lr",
    "optim.min_lr",
    "optim.warmup_steps",
    "optim.weight_decay",
    "optim.adam_beta1",
    "optim.adam_beta2",
    "optim.adam_eps",
    "optim.clip_grad",
    "optim.use_distributed_optimizer",
    "optim.grad_reduce_in_fp32",
    "optim.overlap_grad_reduce",
    "train.steps",
    "train.updates_per_rollout",
    "train.micro_batch_size",
    "train.seed",
    "train.exit_after_steps",
    "train.exit_signal",
    "train.max_skipped_steps",
    "checkpoint.dir",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.overwrite",
    "checkpoint.break_lock",
    "checkpoint.export_hf_every",
    "checkpoint.verify",
    "eval.every",
    "eval.prompts",
    "eval.n",
    "eval.temperature",
    "eval.max_new_tokens",
    "eval.grader",
    "eval.grader_options",
    "eval.pass_k",
    "eval.batch_size",
    "eval.seed",
    "eval.route_field",
    "logging.log_every",
    "logging.jsonl",
    "logging.wandb",
    "logging.wandb_project",
    "logging.run_name",
    "logging.tensorboard",
    "logging.dump_tokens_every",
    "logging.dump_tokens_max",
    "logging.logprob_gap_every",
]


def test_key_set_is_frozen():
    assert config_keys() == FROZEN_KEYS


def test_every_field_has_a_docstring_or_is_self_explanatory():
    # dump -> load round trip keeps every value
    cfg = load_config(None, ["parallel.tp=2", "selection.rule=soft_or", "selection.rho=0.5",
                             "data.prompts=[a.jsonl, b.parquet]", "optim.lr=1e-5"])
    again = from_dict(RunConfig, __import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg
    assert config_to_dict(cfg)["data"]["prompts"] == ["a.jsonl", "b.parquet"]
    assert cfg.optim.lr == 1e-5 and cfg.parallel.tp == 2


@pytest.mark.parametrize("override,message", [
    ("parallel.tpp=2", "unknown config key parallel.tpp; accepted under 'parallel'"),
    ("nonsense=1", "unknown config key nonsense"),
    ("parallel.tp=two", "parallel.tp='two': expected int"),
    ("selection.rule=bogus", "registered rules are"),
    ("selection.rho=1.5", "selection.rho=1.5: must be in \\(0, 1\\]"),
    ("loss.impl=magic", "loss.impl='magic'"),
    ("loss.divergence=kl", r"loss.divergence='kl': accepted values are \['reverse_kl', 'forward_kl', 'jsd'\]"),
    ("loss.jsd_beta=1.0", r"loss.jsd_beta=1.0: must be in the open interval \(0, 1\)"),
    ("loss.one_pass=maybe", "loss.one_pass='maybe': expected bool"),
    ("notakeyvalue", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel: {tp: 2}\nselection: {rule: q3, rho: 0.2}\n")
    cfg = load_config(str(path), ["selection.rho=0.1"])
    assert cfg.parallel.tp == 2 and cfg.selection.rule == "q3" and cfg.selection.rho == 0.1
    with pytest.raises(ValueError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.fixture
def sources(tmp_path):
    """Overrides naming two existing model directories and a prompt file (validate_run
    checks that the directories exist, not what they hold)."""
    (tmp_path / "s").mkdir(), (tmp_path / "t").mkdir()
    return [f"student.ckpt={tmp_path / 's'}", f"teacher.ckpt={tmp_path / 't'}",
            f"data.prompts=[{tmp_path / 'p.jsonl'}]"]


def test_validate_run_divisibility_and_sources(sources):
    validate_run(load_config(None, sources + ["data.prompts_per_step=8"]), world_size=2)
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        validate_run(load_config(None, sources + ["parallel.tp=2"]), world_size=3)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        validate_run(load_config(None, sources + ["data.prompts_per_step=6"]), world_size=4)
    with pytest.raises(ValueError, match="set exactly one of student.ckpt"):
        validate_run(load_config(None, sources[1:]), world_size=1)


#: (overrides, world size, the start of the one-line message). Each bad value is checked
#: on its own before it enters a product or a division (0 here used to raise
#: ZeroDivisionError), and generation options fail at validation, not at the first rollout.
BAD_RUNS = [
    (["rollout.temperature=-1"], 1, r"rollout.temperature=-1.0: must be a finite number >= 0 \(0 = greedy\)"),
    (["rollout.temperature=.inf"], 1, "rollout.temperature=inf: must be a finite"),
    (["rollout.top_p=0"], 1, r"rollout.top_p=0.0: must be in \(0, 1\]"),
    (["rollout.top_p=1.5"], 1, r"rollout.top_p=1.5: must be in \(0, 1\]"),
    (["rollout.env=nocolon"], 1, r"rollout.env='nocolon': must be an import path"),
    (["rollout.env=a.b:C"], 1, r"rollout.turn_stop=\[\]: with rollout.env, a list of"),
    (["rollout.env=a.b:C", "rollout.turn_stop=[x]", "rollout.max_turns=0"], 1,
     r"rollout.max_turns=0: must be an integer >= 1"),
    (["rollout.top_k=-1"], 1, "rollout.top_k=-1: must be an integer >= 0"),
    (["rollout.n=0"], 1, "rollout.n=0: must be an integer >= 1"),
    (["rollout.max_new_tokens=0"], 1, "rollout.max_new_tokens=0: must be an integer >= 1"),
    (["train.updates_per_rollout=0"], 1, "train.updates_per_rollout=0: must be >= 1"),
    (["train.micro_batch_size=0"], 1, "train.micro_batch_size=0: must be >= 1"),
    (["train.micro_batch_size=0"], 2, "train.micro_batch_size=0: must be >= 1"),
    (["train.steps=0"], 1, "train.steps=0: must be >= 1"),
    (["data.prompts_per_step=0"], 1, "data.prompts_per_step=0: must be >= 1"),
    (["data.max_prompt_len=0"], 1, "data.max_prompt_len=0: must be >= 1"),
    (["logging.log_every=0"], 1, "logging.log_every=0: must be >= 1"),
    (["checkpoint.keep_last=-1"], 1, "checkpoint.keep_last=-1: must be >= 0"),
    (["checkpoint.save_every=-2"], 1, "checkpoint.save_every=-2: must be >= 0"),
    (["checkpoint.verify=crc"], 1, r"checkpoint.verify='crc': accepted values are \['full', 'edges'\]"),
    (["data.prompts_per_step=6"], 4, "data.prompts_per_step=6 is not divisible by the data-parallel size 4"),
    (["data.prompts_per_step=2", "train.updates_per_rollout=3"], 1,
     "train.updates_per_rollout=3 exceeds the 2 rollouts per step"),
    (["data.prompts_per_step=6", "train.micro_batch_size=4"], 1,
     "global batch of 6 rollouts .* not divisible by dp x updates_per_rollout x micro_batch_size"),
    (["data.prompts=[]"], 1, "data.prompts is empty: name prompt files"),
    (["optim.lr=0"], 1, "optim.lr=0.0: must be a finite number > 0"),
    # Accepted before (or refused naming optim.min_lr): each makes the weights NaN or inf.
    (["optim.lr=.nan"], 1, "optim.lr=nan: must be a finite number > 0"),
    (["optim.lr=.inf"], 1, "optim.lr=inf: must be a finite number > 0"),
    (["optim.adam_eps=0"], 1, "optim.adam_eps=0.0: must be a finite number > 0"),
    (["optim.adam_eps=-1e-8"], 1, "optim.adam_eps=-1e-08: must be a finite number > 0"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay=-0.1: must be a finite number >= 0"),
    (["optim.clip_grad=.nan"], 1, r"optim.clip_grad=nan: must be a finite number >= 0 \(0 disables\)"),
    (["parallel.sequence_parallel=true", "parallel.tp=1"], 2, "parallel.sequence_parallel=True needs parallel.tp >= 2"),
    (["checkpoint.export_hf_every=-1"], 1, "checkpoint.export_hf_every=-1: must be >= 0"),
    # Accepted before: a launch that stopped at once, saving nothing, with exit code 0.
    (["train.exit_after_steps=0"], 1, "train.exit_after_steps=0: must be >= 1"),
    (["train.exit_after_steps=-1"], 1, "train.exit_after_steps=-1: must be >= 1"),
    # Accepted before, then refused without the key by numpy / the sampler after set-up.
    (["train.seed=-1"], 1, r"train.seed=-1: must be an integer in \[0, 2\*\*32\)"),
    (["data.seed=4294967296"], 1, r"data.seed=4294967296: must be an integer in \[0, 2\*\*32\)"),
    (["eval.every=1", "eval.prompts=[b.jsonl]", "eval.seed=-5"], 1,
     r"eval.seed=-5: must be an integer in \[0, 2\*\*32\)"),
    (["eval.every=2"], 1, r"eval.every > 0 needs eval.prompts"),
    (["eval.every=3", "logging.log_every=2", "eval.prompts=[b.jsonl]"], 1,
     "eval.every=3 must be a multiple of logging.log_every=2"),
    (["eval.every=1", "eval.prompts=[b.jsonl]", "eval.temperature=-1"], 1, "eval.temperature=-1.0: must be"),
    (["eval.every=1", "eval.prompts=[b.jsonl]", "eval.n=0"], 1, "eval.n=0: must be >= 1"),
    (["eval.every=1", "eval.prompts=[b.jsonl]", "eval.n=2", "eval.pass_k=3"], 1,
     r"eval.pass_k=3: must be in \[1, eval.n=2\]"),
    (["eval.every=1", "eval.prompts=[b.jsonl]", "eval.grader=nope"], 1,
     "eval.grader: grader 'nope' is not registered; registered graders: "),
    (["teacher.signal=top64"], 1, r"teacher.signal='top64': accepted values are \['full', 'topk'\]"),
    (["teacher.signal=topk", "teacher.topk=0"], 1, "teacher.topk=0: must be an integer >= 1"),
    (["teacher.signal=topk", "loss.impl=unfused"], 1,
     "teacher.signal='topk' computes its own loss; loss.impl='unfused' applies to"),
    (["teacher.signal=topk", "loss.mix=entropy_aware"], 1,
     "teacher.signal='topk' with loss.mix='entropy_aware': the per-token mix runs in the full-vocabulary"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_RUNS,
                         ids=[" ".join(o) + f" world={w}" for o, w, _ in BAD_RUNS])
def test_validate_run_names_the_key(sources, overrides, world, message):
    cfg = load_config(None, sources + overrides)  # parsing accepts the value; validation refuses it
    with pytest.raises(ValueError, match="^" + message) as err:
        validate_run(cfg, world_size=world)
    assert "\n" not in str(err.value)


def test_chat_template_kwargs_is_a_mapping():
    cfg = load_config(None, ["data.chat_template_kwargs={enable_thinking: false}"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ValueError, match="^data.chat_template_kwargs='x': expected a mapping"):
        load_config(None, ["data.chat_template_kwargs=x"])


def test_the_run_config_rollout_section_is_the_engine_config():
    from tip_megatron.rollout.generate import GenerationConfig, SamplingConfig

    cfg = load_config(None, ["rollout.n=4", "rollout.temperature=0.7", "rollout.top_k=5"])
    assert type(cfg.rollout) is SamplingConfig
    gen = GenerationConfig.from_sampling(cfg.rollout, stop_ids=[3], pad_id=2)
    assert (gen.n, gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (4, 0.7, 5, 1.0, 256)
    assert (gen.stop_ids, gen.pad_id) == ((3,), 2)
    # every rollout key is a GenerationConfig field: one set of options, one set of checks
    rollout_keys = {k.split(".", 1)[1] for k in config_keys() if k.startswith("rollout.")}
    assert rollout_keys <= set(GenerationConfig.__dataclass_fields__)


def test_unknown_builtin_lists_the_registered_names(tmp_path):
    cfg = load_config(None, ["student.builtin=quickstart-studnet", "teacher.builtin=quickstart-teacher"])
    # the installed entry points, sorted (an install made before the multi task's built-ins
    # lacks them: the names listed are those of the package's metadata)
    with pytest.raises(ValueError, match=r"^student.builtin='quickstart-studnet': accepted: "
                                         r"\['quickstart-chain-student', ('quickstart-multi-[a-z-]+', )*"
                                         r"'quickstart-student', 'quickstart-teacher'"
                                         r"(, 'quickstart-tools-[a-z]+')*\]$"):
        validate_run(cfg, world_size=1)
    # the builtin student embeds its task: no prompt files needed
    validate_run(load_config(None, ["student.builtin=quickstart-student",
                                    "teacher.builtin=quickstart-teacher"]), world_size=1)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_parse(path):
    cfg = load_config(str(path))
    assert cfg.student != cfg.teacher


def test_separate_teacher_world_split_named_in_errors():
    from tip_megatron.config import student_world_size

    cfg = load_config(None, ["student.builtin=quickstart-student", "teacher.builtin=quickstart-teacher",
                             "teacher.placement=separate", "parallel.tp=2", "teacher.parallel.dp=2"])
    assert cfg.teacher.ranks(cfg.parallel) == 4 and student_world_size(cfg, 6) == 2
    validate_run(cfg, 6)
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by tp\*pp = 2\*1 = 2; .* "
                                         r"\(the student's ranks: a world of 7 less the teacher's own 4"):
        validate_run(cfg, 7)
    with pytest.raises(ValueError, match="takes 4 ranks .* of a world of 4: none left for the student"):
        validate_run(cfg, 4)


@pytest.mark.parametrize("overrides,source", [
    ([], "generation"),  # one update per rollout batch: the rollout's weights are trained
    (["train.updates_per_rollout=2"], "recompute"),  # update 2 is re-scored with moved weights
    (["train.updates_per_rollout=2", "selection.rescore_each_update=false"], "generation"),
    (["selection.prepass_source=recompute"], "recompute"),
    (["train.updates_per_rollout=2", "selection.rescore_each_update=false",
      "selection.prepass_source=recompute"], "recompute"),
])
def test_prepass_source_auto_is_generation_where_the_rollout_weights_are_trained(overrides, source):
    cfg = load_config(None, ["selection.rule=q3", "selection.rho=0.2", *overrides])
    assert cfg.selection.prepass_source in ("auto", source)
    resolved = run_selection(cfg)
    assert resolved.prepass_source == source
    assert resolved.prepass_from_generation == (source == "generation")
    assert not cfg.selection.prepass_from_generation or source == "generation"  # auto alone: recompute

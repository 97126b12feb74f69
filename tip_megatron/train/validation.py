"""Validation during training, and the in-engine evaluation it shares with the quickstart.

    val = setup_validation(cfg, tokenizer, arch)       # None when eval.every = 0
    metrics = maybe_validate(run)                      # {} unless the step is due

The current student samples the `eval.prompts` benchmark at the training layout (its own
sampling config, seed `eval.seed`) through the one sharded generate-and-grade loop,
`eval.sharded` (the one `tip-megatron eval --ckpt` and `generate` use): which samples are
drawn depends only on the weights, the benchmark, the sampling options and the seed, not
on the DP size, the batch size or the training step, so `tip-megatron eval --ckpt
<run>/step_N` with the same options and seed grades the very samples validation graded at
step N. Nothing of the training state is used or changed: generation's noise is a pure
function of (seed, row, position), the prompt loader is not touched, and the models'
train/eval mode is restored by `generate`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from tip_megatron.data.prompts import PromptDataset, PromptFields
from tip_megatron.eval.config import EvalConfig
from tip_megatron.eval.files import check_benchmark
from tip_megatron.eval.metrics import mean_at_k_by_group
from tip_megatron.eval.sharded import Grading, InEngineResult, generate_and_grade
from tip_megatron.rollout.generate import GenerationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSpec:
    """How to sample and grade (the run config's `eval` section minus `every`/`prompts`)."""

    # The defaults are the config's (`EvalConfig`, documented there), so the two cannot drift.
    n: int = EvalConfig.n
    temperature: float = EvalConfig.temperature
    max_new_tokens: int = EvalConfig.max_new_tokens
    grader: str = EvalConfig.grader
    grader_options: Mapping[str, Any] = field(default_factory=dict)
    pass_k: Optional[int] = EvalConfig.pass_k
    batch_size: int = EvalConfig.batch_size
    seed: int = EvalConfig.seed
    route_field: Optional[str] = None
    """`eval.route_field`: mean@k per value of this record field too."""
    multi_turn: Mapping[str, Any] = field(default_factory=dict)
    """The environment's sampling options (`MULTI_TURN_KEYS` of `rollout.*`: env, env_args,
    max_turns, turn_stop, observation_format, env_timeout_s); empty = one turn. With them,
    `max_new_tokens` is the budget of all turns and observations together."""

    @classmethod
    def from_config(cls, e, rollout=None) -> "ValidationSpec":
        """The `eval` section's spec; a run with `rollout.env` validates through its
        environment (`rollout`: the run's rollout section)."""
        return cls(n=e.n, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                   grader=e.grader, grader_options=dict(e.grader_options), pass_k=e.pass_k,
                   batch_size=e.batch_size, seed=e.seed, route_field=e.route_field,
                   multi_turn=multi_turn_options(rollout))


MULTI_TURN_KEYS = ("env", "env_args", "max_turns", "turn_stop", "observation_format", "env_timeout_s")


def multi_turn_options(rollout) -> dict[str, Any]:
    """A sampling config's environment options (`MULTI_TURN_KEYS`), {} without `env`."""
    if rollout is None or getattr(rollout, "env", None) is None:
        return {}
    return {k: getattr(rollout, k) for k in MULTI_TURN_KEYS}


def load_benchmark(paths: Sequence[str], tokenizer, data, max_prompt_len: int,
                   route_field: Optional[str] = None):
    """The benchmark as a PromptDataset, rendered like the training prompts (`data`'s
    fields, chat template, its kwargs and system prompt); every row needs an answer (and
    the `route_field`, when given: mean@k per value)."""
    fields = PromptFields(prompt=data.prompt_field, messages=data.messages_field,
                          answer=data.answer_field, route=route_field)
    check_benchmark(list(paths), fields)
    return PromptDataset(list(paths), tokenizer, fields=fields,
                         apply_chat_template=data.apply_chat_template,
                         max_prompt_len=max_prompt_len, overlong=data.overlong,
                         chat_template_kwargs=data.chat_template_kwargs,
                         system_prompt=data.system_prompt)


def evaluate_in_engine(chunks, groups, arch, tokenizer, dataset, spec: ValidationSpec) -> InEngineResult:
    """Sample `spec.n` responses per benchmark prompt with `chunks` and grade them through
    the one sharded loop (`eval.sharded.generate_and_grade`, the one `tip-megatron eval
    --ckpt` uses: the same checkpoint, benchmark and seed give the same samples and grades).
    Collective over the world; every rank returns the same result. With
    `spec.multi_turn`, each sample is a multi-turn rollout with its prompt record's
    environment, graded on its whole text after the prompt (observations included)."""
    config = GenerationConfig(n=spec.n, max_new_tokens=spec.max_new_tokens,
                              temperature=spec.temperature, stop_ids=tuple(tokenizer.stop_ids),
                              pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size,
                              **dict(spec.multi_turn))
    return generate_and_grade(chunks, groups, arch, tokenizer, dataset, config,
                              Grading(spec.grader, dict(spec.grader_options), spec.pass_k),
                              seed=spec.seed, batch_size=spec.batch_size)


# ------------------------------------------------------------------ the trainer's hook
@dataclass
class Validation:
    """The config's benchmark (`eval.*`). Any object with `every` and `__call__(run) ->
    metrics` can stand in `Run.validation` (the quickstart's in-memory benchmark does)."""

    every: int
    spec: ValidationSpec
    dataset: Any

    def __call__(self, run) -> dict[str, float]:
        result = evaluate_in_engine(run.ddp, run.groups, run.models.student_arch, run.tokenizer,
                                    self.dataset, self.spec)
        s = result.summary
        groups = {}
        if self.spec.route_field:  # mean@k per domain
            values = [self.dataset.route(i) for i in range(len(self.dataset))]
            groups = mean_at_k_by_group(result.counts, values)
        if run.log.active:
            per_group = "".join(f" | {g} {100 * v:6.2f}%" for g, v in groups.items())
            print(f"eval  {run.step:5d} | mean@{s.samples_per_prompt} {100 * s.mean_at_k:6.2f}% | "
                  f"pass@{s.k} {100 * s.pass_at_k:6.2f}% | unparsed {s.num_unparsed} | "
                  f"{s.num_prompts} prompts, grader {s.grader}{per_group}", flush=True)
        return dict(result.metrics(), **{f"eval/{g}/mean_at_k": v for g, v in groups.items()})


def setup_validation(cfg, tokenizer, arch) -> Optional[Validation]:
    """The run's validation (benchmark tokenized now, so bad files stop the run at set-up)."""
    e = cfg.eval
    if not e.every:
        return None
    limit = min(cfg.data.max_prompt_len, arch.max_position_embeddings - e.max_new_tokens)
    if limit < 1:
        raise ValueError(f"eval.max_new_tokens={e.max_new_tokens} leaves no room for a prompt in "
                         f"the student's max_position_embeddings={arch.max_position_embeddings}")
    return Validation(e.every, ValidationSpec.from_config(e, cfg.rollout),
                      load_benchmark(e.prompts, tokenizer, cfg.data, limit, e.route_field))


def maybe_validate(run) -> dict[str, float]:
    """Validate the student when `run.step` is a multiple of `run.validation.every`: the
    metrics to log with this step (eval/mean_at_k, eval/pass_at_k, eval/num_unparsed for
    the config's benchmark), else {}. Collective: every rank calls it."""
    val = run.validation
    if val is None or run.step % val.every != 0:
        return {}
    return val(run)

"""Validation during training, and the in-engine evaluation it shares with the quickstart.

    val = setup_validation(cfg, tokenizer, arch)       # None when eval.every = 0
    metrics = maybe_validate(run)                      # {} unless the step is due

The current student samples the `eval.prompts` benchmark with the trainer's own `generate`
at the training layout (its own sampling config, seed `eval.seed`). DP replicas take
contiguous slices of the prompts (sample noise depends on the global row, so any DP size
draws the same samples); the first rank of each model-parallel group grades its share in
its main thread (math-verify's timeouts use SIGALRM) and the per-prompt counts are
gathered, so every rank holds the same summary. Nothing of the training state is used or
changed: generation's noise is a pure function of (seed, step, row, position), the prompt
loader is not touched, and the models' train/eval mode is restored by `generate`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch.distributed as dist

from tip_megatron.config import EvalConfig
from tip_megatron.eval import PromptCounts, Sample, count_prompts, get_grader, grade_samples, summarize
from tip_megatron.eval.metrics import EvalSummary

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

    @classmethod
    def from_config(cls, e) -> "ValidationSpec":
        return cls(n=e.n, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                   grader=e.grader, grader_options=dict(e.grader_options), pass_k=e.pass_k,
                   batch_size=e.batch_size, seed=e.seed)


@dataclass(frozen=True)
class InEngineResult:
    summary: EvalSummary
    counts: list[PromptCounts]
    """Every prompt's counts, by index into the benchmark (the same on every rank)."""

    def metrics(self) -> dict[str, float]:
        s = self.summary
        return {"eval/mean_at_k": s.mean_at_k, "eval/pass_at_k": s.pass_at_k,
                "eval/num_unparsed": float(s.num_unparsed)}


def load_benchmark(paths: Sequence[str], tokenizer, data, max_prompt_len: int):
    """The benchmark as a PromptDataset, rendered like the training prompts (`data`'s
    fields, chat template, its kwargs and system prompt); every row needs an answer."""
    from tip_megatron.eval.files import check_benchmark
    from tip_megatron.data.prompts import PromptDataset, PromptFields

    fields = PromptFields(prompt=data.prompt_field, messages=data.messages_field,
                          answer=data.answer_field)
    check_benchmark(list(paths), fields)
    return PromptDataset(list(paths), tokenizer, fields=fields,
                         apply_chat_template=data.apply_chat_template,
                         max_prompt_len=max_prompt_len, overlong=data.overlong,
                         chat_template_kwargs=data.chat_template_kwargs,
                         system_prompt=data.system_prompt)


def _share(total: int, rank: int, size: int) -> range:
    """Contiguous slice `rank` of `size` over `total` prompts (the first ones get one more)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def evaluate_in_engine(chunks, groups, arch, tokenizer, dataset, spec: ValidationSpec,
                       step: int = 0) -> InEngineResult:
    """Sample `spec.n` responses per benchmark prompt with `chunks` and grade them
    (collective over the world; every rank returns the same result)."""
    from tip_megatron.rollout.generate import GenerationConfig, generate

    grade = get_grader(spec.grader, spec.grader_options)
    config = GenerationConfig(n=spec.n, max_new_tokens=spec.max_new_tokens,
                              temperature=spec.temperature, stop_ids=tuple(tokenizer.stop_ids),
                              pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    mine = _share(len(dataset), groups.dp_rank, groups.dp_size)
    grades_here = groups.tp_rank == 0 and groups.pp_rank == 0
    counts: list[PromptCounts] = []
    for start in range(mine.start, mine.stop, spec.batch_size):
        indices = list(range(start, min(start + spec.batch_size, mine.stop)))
        records = dataset.records(indices)
        out = generate(chunks, groups, arch, [r.token_ids for r in records], config,
                       seed=spec.seed, step=step, row_offset=start * spec.n)
        if grades_here:
            samples = [Sample(prompt_index=indices[int(out.prompt_index[row])],
                              sample_index=int(out.sample_index[row]),
                              response=tokenizer.decode(out.response(row), skip_special_tokens=True),
                              answer=str(records[int(out.prompt_index[row])].answer))
                       for row in range(out.num_rows)]
            counts += count_prompts(samples, grade_samples(samples, grade))
    merged = _gather_counts(counts, groups)
    return InEngineResult(summarize(merged, spec.grader, spec.pass_k), merged)


def _gather_counts(counts: list[PromptCounts], groups) -> list[PromptCounts]:
    if groups.world_size == 1:
        return sorted(counts, key=lambda c: c.prompt_index)
    every: list = [None] * groups.world_size
    dist.all_gather_object(every, counts)
    return sorted((c for part in every for c in part), key=lambda c: c.prompt_index)


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
                                    self.dataset, self.spec, step=run.step)
        s = result.summary
        if run.log.active:
            print(f"eval  {run.step:5d} | mean@{s.samples_per_prompt} {100 * s.mean_at_k:6.2f}% | "
                  f"pass@{s.k} {100 * s.pass_at_k:6.2f}% | unparsed {s.num_unparsed} | "
                  f"{s.num_prompts} prompts, grader {s.grader}", flush=True)
        return result.metrics()


def setup_validation(cfg, tokenizer, arch) -> Optional[Validation]:
    """The run's validation (benchmark tokenized now, so bad files stop the run at set-up)."""
    e = cfg.eval
    if not e.every:
        return None
    limit = min(cfg.data.max_prompt_len, arch.max_position_embeddings - e.max_new_tokens)
    if limit < 1:
        raise ValueError(f"eval.max_new_tokens={e.max_new_tokens} leaves no room for a prompt in "
                         f"the student's max_position_embeddings={arch.max_position_embeddings}")
    return Validation(e.every, ValidationSpec.from_config(e),
                      load_benchmark(e.prompts, tokenizer, cfg.data, limit))


def maybe_validate(run) -> dict[str, float]:
    """Validate the student when `run.step` is a multiple of `run.validation.every`: the
    metrics to log with this step (eval/mean_at_k, eval/pass_at_k, eval/num_unparsed for
    the config's benchmark), else {}. Collective: every rank calls it."""
    val = run.validation
    if val is None or run.step % val.every != 0:
        return {}
    return val(run)

"""The one sharded generate-and-grade loop: `tip-megatron generate`, `tip-megatron eval
--ckpt` and validation during training all draw their samples here.

    lines = generate_shard(chunks, groups, arch, tokenizer, dataset, config, seed=1, batch_size=16)
    lines = gather_lines(lines, groups)              # every line on rank 0, None elsewhere
    result = generate_and_grade(chunks, groups, arch, tokenizer, dataset, config,
                                Grading("math"), seed=1, batch_size=16)   # the same on every rank

Which samples are drawn is a pure function of (weights, prompts, sampling options, seed):
DP replica r of d takes the r-th contiguous slice of the prompts, and every draw's noise
is keyed by (seed, the sample's global row = prompt index * n + sample index, position)
at generation step 0 (rollout/generate.py). So the DP size, the batch size and the caller
(generate, eval --ckpt, validation at any training step) do not change the samples: the
same checkpoint, prompts and seed give the same texts and grades everywhere.

A line (one sample; what `tip-megatron generate` writes): {"prompt_id", "prompt_index",
"sample_index", "token_ids" (generated ids, the stop token included), "text" (decoded
without special tokens), "finish_reason" ("stop" | "length"), "num_prompt_tokens",
"answer" (when the prompt row has one)}. Lines are made on the first rank of each
model-parallel group (tp_rank = pp_rank = 0), where the sampled tokens are complete.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch.distributed as dist

from tip_megatron.data.sources import PromptRecord
from tip_megatron.eval.evaluate import Sample, count_prompts, grade_samples
from tip_megatron.eval.graders import get_grader
from tip_megatron.eval.metrics import EvalSummary, PromptCounts, summarize
from tip_megatron.rollout.generate import Episodes, GenerationConfig, generate
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.runtime.progress import Progress

logger = logging.getLogger(__name__)

__all__ = ["Grading", "InEngineResult", "dp_share", "gather_lines", "generate_and_grade",
           "generate_shard", "line_samples"]


class Benchmark(Protocol):
    """What the loop reads prompts from (`data.prompts.PromptDataset`, or in memory)."""

    def __len__(self) -> int: ...

    def records(self, indices: Sequence[int]) -> list[PromptRecord]: ...


@dataclass(frozen=True)
class Grading:
    """How the samples are graded: a registered grader, its options, k of pass@k."""

    grader: str = "math"
    options: Mapping[str, Any] = field(default_factory=dict)
    pass_k: Optional[int] = None


@dataclass(frozen=True)
class InEngineResult:
    summary: EvalSummary
    counts: list[PromptCounts]
    """Every prompt's counts, by index into the benchmark (the same on every rank)."""

    def metrics(self) -> dict[str, float]:
        s = self.summary
        return {"eval/mean_at_k": s.mean_at_k, "eval/pass_at_k": s.pass_at_k,
                "eval/num_unparsed": float(s.num_unparsed)}


def dp_share(total: int, dp_rank: int, dp_size: int) -> range:
    """Contiguous slice `dp_rank` of `dp_size` over `total` prompts (the first ones get one more)."""
    base, extra = divmod(total, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return range(start, start + base + (dp_rank < extra))


def generate_shard(chunks, groups: ParallelGroups, arch, tokenizer, dataset: Benchmark,
                   config: GenerationConfig, *, seed: int, batch_size: int,
                   progress: bool = False) -> list[dict]:
    """Sample `config.n` responses for each prompt of this DP replica's share, `batch_size`
    prompts per generate call (collective over the model-parallel group). Returns the
    lines in (prompt, sample) order on the first rank of the model-parallel group, []
    elsewhere. progress: a progress line on global rank 0 (its replica's share)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1 (prompts per generate call)")
    mine = dp_share(len(dataset), groups.dp_rank, groups.dp_size)
    writer = groups.tp_rank == 0 and groups.pp_rank == 0
    desc = "generated" if groups.dp_size == 1 else "generated (DP rank 0's share)"
    bar = Progress(len(mine), desc, unit="prompt", enabled=progress and groups.rank == 0, log=logger)
    lines: list[dict] = []
    for start in range(mine.start, mine.stop, batch_size):
        indices = list(range(start, min(start + batch_size, mine.stop)))
        records = dataset.records(indices)
        # The noise of a draw is keyed by its global row: the samples do not depend on the
        # DP size, the batch size or the caller.
        # Multi-turn: one environment per sample, built from its prompt's record.
        episodes = Episodes(records, tokenizer) if config.multi_turn else None
        out = generate(chunks, groups, arch, [r.token_ids for r in records], config,
                       seed=seed, step=0, row_offset=start * config.n, episodes=episodes)
        if writer:
            lines += _lines(out, records, indices, tokenizer)
        if groups.rank == 0 and out.logprob_gap is not None:
            logger.info("prompts %d-%d: train/inference log-prob gap max %.3g mean %.3g over %d "
                        "tokens", indices[0], indices[-1], out.logprob_gap["max"],
                        out.logprob_gap["mean"], out.logprob_gap["tokens"])
        bar.update(len(indices))
    bar.close()
    return lines


def _lines(rollouts, records: list[PromptRecord], indices: list[int], tokenizer) -> list[dict]:
    out = []
    for row in range(rollouts.num_rows):
        k = int(rollouts.prompt_index[row])
        ids = rollouts.response(row)
        line = dict(prompt_id=records[k].prompt_id, prompt_index=indices[k],
                    sample_index=int(rollouts.sample_index[row]), token_ids=ids,
                    text=tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="stop" if bool(rollouts.stopped[row]) else "length",
                    num_prompt_tokens=int(rollouts.prompt_lengths[row]))
        if records[k].answer is not None:
            line["answer"] = records[k].answer
        out.append(line)
    return out


def gather_lines(lines: list[dict], groups: ParallelGroups) -> Optional[list[dict]]:
    """Every replica's lines on global rank 0, in (prompt, sample) order; None elsewhere."""
    if groups.world_size == 1:
        return sorted(lines, key=_order)
    gathered: Optional[list] = [None] * groups.world_size if groups.rank == 0 else None
    dist.gather_object(lines, gathered, dst=0)
    if groups.rank != 0:
        return None
    return sorted((line for part in gathered for line in part), key=_order)


def _order(line: dict) -> tuple[int, int]:
    return line["prompt_index"], line["sample_index"]


def line_samples(lines: Sequence[dict]) -> list[Sample]:
    """The lines as the graders read them (every line needs an answer)."""
    return [Sample(int(x["prompt_index"]), int(x["sample_index"]), x["text"], str(x["answer"]))
            for x in lines]


def generate_and_grade(chunks, groups: ParallelGroups, arch, tokenizer, dataset: Benchmark,
                       config: GenerationConfig, grading: Grading, *, seed: int,
                       batch_size: int) -> InEngineResult:
    """`generate_shard`, each replica's lines graded where they are made (in the main
    thread: math-verify's timeouts use SIGALRM), the per-prompt counts gathered: every
    rank returns the same result (collective over the world)."""
    grade = get_grader(grading.grader, grading.options)  # an unknown grader stops before sampling
    lines = generate_shard(chunks, groups, arch, tokenizer, dataset, config, seed=seed,
                           batch_size=batch_size)
    samples = line_samples(lines)
    counts = count_prompts(samples, grade_samples(samples, grade))
    merged = _gather_counts(counts, groups)
    return InEngineResult(summarize(merged, grading.grader, grading.pass_k), merged)


def _gather_counts(counts: list[PromptCounts], groups: ParallelGroups) -> list[PromptCounts]:
    if groups.world_size == 1:
        return sorted(counts, key=lambda c: c.prompt_index)
    every: list = [None] * groups.world_size
    dist.all_gather_object(every, counts)
    return sorted((c for part in every for c in part), key=lambda c: c.prompt_index)

"""Grade already-generated samples and summarize them, however they were produced.

    samples = [Sample(prompt_index=p, sample_index=s, response=text, answer=answer), ...]
    result = evaluate(samples, grader="math")          # EvalResult(grades, summary)
    result.summary.mean_at_k, result.summary.pass_at_k

The CLI (`tip-megatron eval`) and validation during training call this same function;
responses are decoded text (`tokenizer.decode(ids, skip_special_tokens=True)`, as
`tip-megatron generate` writes). Grading runs in the calling process (math-verify's
timeouts use SIGALRM: call it from the main thread).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from tip_megatron.eval.graders import Grade, GradeFn, get_grader
from tip_megatron.eval.metrics import EvalSummary, PromptCounts, summarize
from tip_megatron.runtime.progress import Progress

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "Sample", "count_prompts", "evaluate", "grade_samples"]


@dataclass(frozen=True)
class Sample:
    """One generated response and the answer of its prompt."""

    prompt_index: int
    sample_index: int
    response: str
    answer: str


@dataclass(frozen=True)
class EvalResult:
    grades: list[Grade]  # one per sample, in the order given
    summary: EvalSummary


def grade_samples(samples: Sequence[Sample], grade: GradeFn, progress: bool = False) -> list[Grade]:
    """`grade(response, answer)` of every sample, in order."""
    bar = Progress(len(samples), "graded", unit="sample", enabled=progress, log=logger)
    out = []
    try:
        for s in samples:
            out.append(grade(s.response, s.answer))
            bar.update()
    finally:
        bar.close()
    return out


def count_prompts(samples: Sequence[Sample], grades: Sequence[Grade]) -> list[PromptCounts]:
    """Per-prompt counts, by prompt index; a repeated (prompt, sample) pair is a ValueError."""
    seen: set[tuple[int, int]] = set()
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s, g in zip(samples, grades, strict=True):
        key = (s.prompt_index, s.sample_index)
        if key in seen:
            raise ValueError(f"sample {s.sample_index} of prompt {s.prompt_index} appears twice")
        seen.add(key)
        t = tally[s.prompt_index]
        t[0], t[1], t[2] = t[0] + 1, t[1] + int(g.correct), t[2] + int(g.unparsed)
    return [PromptCounts(p, *tally[p]) for p in sorted(tally)]


def evaluate(samples: Sequence[Sample], grader: str = "math",
             options: Optional[Mapping[str, Any]] = None, pass_k: Optional[int] = None,
             progress: bool = False) -> EvalResult:
    """Grade `samples` with the registered `grader` and summarize (mean@k, pass@k)."""
    grades = grade_samples(samples, get_grader(grader, options), progress=progress)
    return EvalResult(grades, summarize(count_prompts(samples, grades), grader, pass_k))

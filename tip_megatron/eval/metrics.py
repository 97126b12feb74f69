"""mean@k and pass@k from per-prompt counts (n samples, c of them correct).

    mean_at_k = (1 / P) * sum_p c_p / n              (the paper's mean@16 at n = 16)
    pass_at_k = (1 / P) * sum_p [1 - C(n - c_p, k) / C(n, k)]    (Chen et al. 2021)

pass@k is the unbiased estimator of "at least one of k samples is correct", computed as
1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the binomials (they overflow
float64 near n = 1030). Every prompt must have the same n; k defaults to n.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

__all__ = ["EvalSummary", "PromptCounts", "pass_at_k", "summarize"]


@dataclass(frozen=True)
class PromptCounts:
    """Grades of one prompt's samples."""

    prompt_index: int
    num_samples: int
    num_correct: int
    num_unparsed: int


@dataclass(frozen=True)
class EvalSummary:
    """What `tip-megatron eval --json` writes; accuracies are fractions in [0, 1]."""

    grader: str
    num_prompts: int
    num_samples: int
    samples_per_prompt: int
    k: int  # the k of pass_at_k
    mean_at_k: float  # accuracy over all samples
    pass_at_k: float
    num_correct: int
    num_unparsed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c correct, is correct)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={n}]")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def summarize(counts: Sequence[PromptCounts], grader: str, k: Optional[int] = None) -> EvalSummary:
    """The summary over prompts; k=None means k = samples per prompt."""
    if not counts:
        raise ValueError("no samples to summarize")
    sizes = {c.num_samples for c in counts}
    if len(sizes) != 1:
        small = min(counts, key=lambda c: c.num_samples)
        large = max(counts, key=lambda c: c.num_samples)
        raise ValueError(f"every prompt needs the same number of samples: prompt "
                         f"{small.prompt_index} has {small.num_samples}, prompt "
                         f"{large.prompt_index} has {large.num_samples}")
    n = sizes.pop()
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"--pass-k {k}: must be in [1, samples per prompt = {n}]")
    num_prompts = len(counts)
    return EvalSummary(
        grader=grader, num_prompts=num_prompts, num_samples=n * num_prompts,
        samples_per_prompt=n, k=k,
        mean_at_k=sum(c.num_correct for c in counts) / (n * num_prompts),
        pass_at_k=sum(pass_at_k(n, c.num_correct, k) for c in counts) / num_prompts,
        num_correct=sum(c.num_correct for c in counts),
        num_unparsed=sum(c.num_unparsed for c in counts),
    )


def mean_at_k_by_group(counts: Sequence[PromptCounts], group_of: Sequence[str]) -> dict[str, float]:
    """{group: mean@k over its prompts} (`group_of[i]`: the group of prompt index i)."""
    correct: dict[str, int] = {}
    samples: dict[str, int] = {}
    for c in counts:
        g = group_of[c.prompt_index]
        correct[g] = correct.get(g, 0) + c.num_correct
        samples[g] = samples.get(g, 0) + c.num_samples
    return {g: correct[g] / samples[g] for g in sorted(samples) if samples[g]}

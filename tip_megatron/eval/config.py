"""The `eval` section of the run config: validation during training (train/validation.py),
which samples and grades through the one sharded loop (eval/sharded.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tip_megatron.eval.graders import get_grader
from tip_megatron.rollout.types import SamplingConfig
from tip_megatron.runtime.typed_tree import at_least, check_seed


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training: the student samples a benchmark in-engine at the
    training layout and is graded (logged as eval/mean_at_k, eval/pass_at_k)."""

    every: int = 0
    """Validate every N steps (0: off)."""
    prompts: tuple[str, ...] = ()
    """Benchmark files (JSONL / parquet: prompt or messages, and answer)."""
    n: int = 4
    """Samples per prompt (the k of mean@k)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    max_new_tokens: int = 256
    """Response length limit of a validation sample (the paper evaluates up to 8192)."""
    grader: str = "math"
    """A registered grader (`tip_megatron.eval.GRADERS`: math, exact, regex, ...)."""
    grader_options: dict[str, Any] = field(default_factory=dict)
    """Grader options (regex: {pattern: ...})."""
    pass_k: Optional[int] = None
    """k of pass@k (null: n)."""
    batch_size: int = 16
    """Prompts per generate call (per data-parallel rank)."""
    seed: int = 4321
    """Sampling seed of validation (its noise never touches the training streams)."""
    route_field: Optional[str] = None
    """A benchmark record field (e.g. `domain`, as `data.route_field` for several teachers):
    also log mean@k per value of it (`eval/<value>/mean_at_k`); every record must have it."""

    def validate(self, prefix: str = "eval.") -> None:
        at_least(prefix, self, every=0)
        if not self.every:
            return
        if not self.prompts:
            raise ValueError(f"{prefix}every > 0 needs {prefix}prompts (benchmark JSONL/parquet "
                             "files with prompt or messages, and answer)")
        at_least(prefix, self, n=1, max_new_tokens=1, batch_size=1)
        check_seed(f"{prefix}seed", self.seed)
        SamplingConfig(n=self.n, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature).validate(prefix)
        if self.pass_k is not None and not 1 <= self.pass_k <= self.n:
            raise ValueError(f"{prefix}pass_k={self.pass_k}: must be in [1, {prefix}n={self.n}]")
        try:
            get_grader(self.grader, self.grader_options)
        except (ValueError, ImportError) as err:
            raise ValueError(f"{prefix}grader: {err}") from None

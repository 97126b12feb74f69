"""TIP selection rules, registered by name, and `select`: signals in, kept mask out.

Shapes: `[tokens]` for one micro-batch (sequences flattened in order).

    config = SelectionConfig(rule="soft_or", rho=0.5)
    kept_mask = select(config, signals, step=step)                  # rollout / microbatch
    kept_masks = select_global(config, microbatches, dp_group, step=step)   # global scope

A rule is a pure function `RuleInputs -> Ranking` (a key per token, which tokens are
eligible, the fraction to keep and the counting unit); `select` keeps the top tokens.
Counting: `soft_or` and `soft_or_bottom` keep floor(rho * m) per rollout (m = that
rollout's response tokens); every other counted rule keeps floor(rho * m) per
normalization group (a rollout, the micro-batch, or the global batch). No hidden minimum:
a count group keeps at least `min_keep` tokens only when that is set (default 0).
Nothing outside the response is ever kept.

Each rule carries its paper scope (`PAPER_SCOPES`): the scope `selection.scope=auto`
(the default) resolves to. Soft-OR and Soft-OR-bottom are per rollout (the paper's
Eq. 7-8); the other rules normalise and rank over the global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.tip.quadrants import QUADRANTS, QuadrantRule, quadrant_labels
from tip_megatron.tip.ranking import Ranking, keep_top, keep_top_global, rollout_uniforms
from tip_megatron.tip.scores import (
    SCOPES, NormStats, Scores, check_scope, compute_norm_stats, compute_scores, global_norm_stats,
)
from tip_megatron.tip.signals import TokenSignals

RuleFn = Callable[["RuleInputs"], Ranking]
RULES: dict[str, RuleFn] = {}
PAPER_SCOPES: dict[str, str] = {}
"""rule -> the scope `selection.scope=auto` resolves to (the paper's reading of the rule)."""
COUNTED_PER_ROLLOUT: set[str] = set()
"""Rules whose Ranking counts per rollout whatever the scope (Soft-OR, Soft-OR-bottom)."""
AUTO_SCOPE = "auto"
PREPASS_SOURCES = ("recompute", "generation")
"""Where the scoring pre-pass reads the student's hidden states (`SelectionConfig.prepass_source`)."""


def register_rule(
    name: str, paper_scope: str = "global", counted_per_rollout: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator: make `fn` selectable as `SelectionConfig(rule=name)`; `paper_scope` is
    the scope used under `selection.scope=auto` (`rollout`, `microbatch` or `global`);
    `counted_per_rollout` declares that `fn` returns `Ranking(per_rollout=True)`."""
    check_scope(paper_scope)

    def wrap(fn: RuleFn) -> RuleFn:
        if name in RULES:
            raise ValueError(f"selection rule {name!r} is already registered")
        RULES[name] = fn
        PAPER_SCOPES[name] = paper_scope
        if counted_per_rollout:
            COUNTED_PER_ROLLOUT.add(name)
        return fn
    return wrap


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SelectionConfig:
    """Which tokens the student learns from. Validated on construction."""

    rule: str = "all"
    """Registered rule name: all, random, entropy_sample, entropy_topk, soft_or,
    soft_or_bottom, q3, div_topk, quadrants."""
    rho: float = 1.0
    """Retention ratio in (0, 1]; `all` requires 1.0, `quadrants` uses < 1.0 as a cap."""
    seed: int = 0
    """Seed of the sampled rules (random, entropy_sample), combined with step and rollout id."""
    scope: str = AUTO_SCOPE
    """Normalization group of h^ and d^ (and counting group of the non-Soft-OR rules):
    `auto` (the rule's paper scope: `rollout` for soft_or / soft_or_bottom / all, `global`
    for the others), `rollout`, `microbatch` (one pass each; `microbatch` depends on the
    parallel layout) or `global` (the global batch, all DP ranks; a scoring pre-pass)."""
    min_keep: int = 0
    """A count group with m > 0 response tokens keeps at least min(min_keep, m); 0 (the
    default) keeps exactly floor(rho * m)."""
    rescore_each_update: bool = True
    """With train.updates_per_rollout > 1 and an effective scope `global`: score and select
    each update's mini-batch (global across DP) with the current weights, right before that
    update (same total cost as one pre-pass over the rollout batch). False: one pre-pass
    over the whole rollout batch before the first update; later updates reuse its masks."""
    prepass_source: str = "recompute"
    """Where the scoring pre-pass of an effective scope `global` gets the student's final
    hidden states: `recompute` (a forward-only student pass over the rollouts, the training
    pass's own forward code; any number of updates) or `generation` (the ones the generation
    engine computed while sampling: same weights, no second student forward; kept on the
    last pipeline stage, [response tokens, h] per DP rank in the compute dtype, released
    once scored). `generation` needs the masks chosen with the rollout's own policy: it is
    refused with train.updates_per_rollout > 1 and rescore_each_update=true. Signals differ
    from `recompute` by kernel rounding only (docs/tip.md). With an effective scope that has
    no pre-pass (`rollout`, `microbatch`) it does nothing: nothing is kept."""
    quadrant_rule: QuadrantRule = field(default_factory=QuadrantRule)
    """How quadrants are labeled (rule `quadrants` and the metrics)."""
    keep_quadrants: tuple[int, ...] = (1, 3)
    """Rule `quadrants`: the union of quadrants kept (1..4); ranked by Soft-OR s under a cap."""

    def __post_init__(self) -> None:
        self.validate()  # built directly by the engine and tests too, not only from a config

    def validate(self, prefix: str = "selection.") -> None:
        """ValueError naming `<prefix><field>` and what is accepted."""
        if self.rule not in RULES:
            raise ValueError(f"{prefix}rule={self.rule!r}: registered rules are {sorted(RULES)}")
        rho_ok = isinstance(self.rho, (int, float)) and not isinstance(self.rho, bool)
        if not rho_ok or not math.isfinite(self.rho) or not 0.0 < self.rho <= 1.0:
            raise ValueError(f"{prefix}rho={self.rho!r}: must be in (0, 1]")
        if self.rule == "all" and self.rho != 1.0:
            raise ValueError(f"{prefix}rho={self.rho!r}: rule 'all' keeps every token; "
                             "use rho=1.0")
        if self.scope != AUTO_SCOPE and self.scope not in SCOPES:
            raise ValueError(f"{prefix}scope={self.scope!r}: accepted values are "
                             f"{[AUTO_SCOPE, *SCOPES]}")
        if not isinstance(self.rescore_each_update, bool):
            raise ValueError(f"{prefix}rescore_each_update={self.rescore_each_update!r}: "
                             "must be true or false")
        if self.prepass_source not in PREPASS_SOURCES:
            raise ValueError(f"{prefix}prepass_source={self.prepass_source!r}: accepted values are "
                             f"{list(PREPASS_SOURCES)}")
        if not _is_int(self.seed):
            raise ValueError(f"{prefix}seed={self.seed!r}: must be an integer")
        if not _is_int(self.min_keep) or self.min_keep < 0:
            raise ValueError(f"{prefix}min_keep={self.min_keep!r}: must be an integer >= 0")
        if not self.keep_quadrants or not set(self.keep_quadrants) <= {int(q) for q in QUADRANTS}:
            raise ValueError(f"{prefix}keep_quadrants={self.keep_quadrants!r}: "
                             "a non-empty subset of {1, 2, 3, 4}")
        if not isinstance(self.quadrant_rule, QuadrantRule):
            raise ValueError(f"{prefix}quadrant_rule: must be a QuadrantRule")
        self.quadrant_rule.validate(f"{prefix}quadrant_rule.")

    @property
    def effective_scope(self) -> str:
        """The scope in force: `scope`, or the rule's paper scope when `scope` is `auto`."""
        return PAPER_SCOPES[self.rule] if self.scope == AUTO_SCOPE else self.scope

    @property
    def count_unit(self) -> Optional[str]:
        """What floor(rho * m) is counted over: `rollout`, `microbatch`, `global`, or None
        when nothing is counted (rule `all`, uncapped `quadrants`)."""
        if self.rule == "all" or self.rho >= 1.0:
            return None
        return "rollout" if self.rule in COUNTED_PER_ROLLOUT else self.effective_scope

    @property
    def needs_prepass(self) -> bool:
        """Whether the step needs the scoring pre-pass (effective scope `global`)."""
        return self.effective_scope == "global"

    @property
    def prepass_from_generation(self) -> bool:
        """Whether the pre-pass scores the generation engine's hidden states (then the
        rollouts must keep them)."""
        return self.needs_prepass and self.prepass_source == "generation"


@dataclass(frozen=True)
class RuleInputs:
    """What a rule may read; the derived quantities are computed on demand."""

    signals: TokenSignals
    config: SelectionConfig
    step: int
    norm_stats: Optional[NormStats]

    def stats(self) -> NormStats:
        if self.norm_stats is not None:
            return self.norm_stats
        if self.config.effective_scope == "global":
            raise ValueError("selection.scope='global' needs norm_stats from global_norm_stats "
                             "(a scoring pre-pass over the global batch), or use select_global")
        return compute_norm_stats(self.signals, self.config.effective_scope,
                                  split_quantiles=self.config.quadrant_rule.split_quantiles)

    def scores(self) -> Scores:
        return compute_scores(self.signals, self.stats())

    def labels(self) -> torch.Tensor:
        return selection_labels(self.config, self.signals, self.norm_stats)

    def uniforms(self) -> torch.Tensor:
        return rollout_uniforms(self.signals, self.config.seed, self.step)

    def ranking(self, key: torch.Tensor, per_rollout: bool = False, **kwargs) -> Ranking:
        """A Ranking over the response tokens with fraction rho (the common case)."""
        kwargs.setdefault("eligible", self.signals.response_mask)
        kwargs.setdefault("fraction", self.config.rho)
        return Ranking(key=key, per_rollout=per_rollout, **kwargs)


@register_rule("all", paper_scope="rollout")
def rule_all(x: RuleInputs) -> Ranking:
    """Every response token (the full-token OPD baseline)."""
    return x.ranking(torch.zeros(x.signals.num_tokens, dtype=torch.float64), fraction=1.0)


@register_rule("random")
def rule_random(x: RuleInputs) -> Ranking:
    """Uniform sample without replacement (the baseline the paper lacks)."""
    return x.ranking(x.uniforms())


@register_rule("entropy_sample")
def rule_entropy_sample(x: RuleInputs) -> Ranking:
    """Sample without replacement, p proportional to h (Efraimidis-Spirakis keys log(u)/h).

    Keeping the top-k of u^(1/h) is exactly successive sampling proportional to h. Tokens
    with h = 0 have key -inf and are drawn last, uniformly (by the u tie-break).
    """
    u, h = x.uniforms(), x.signals.entropy_norm.double().clamp_min(0.0)
    key = torch.where(h > 0, torch.log(u) / torch.where(h > 0, h, 1.0), float("-inf"))
    return x.ranking(key, secondary=u)


@register_rule("entropy_topk")
def rule_entropy_topk(x: RuleInputs) -> Ranking:
    """Highest h (raw, not clipped: clipping would tie the top 2%)."""
    return x.ranking(x.signals.entropy_norm.double())


@register_rule("soft_or", paper_scope="rollout", counted_per_rollout=True)
def rule_soft_or(x: RuleInputs) -> Ranking:
    """Type-aware TIP: highest s = h^ + d^ - h^ d^, floor(rho * m) per rollout."""
    return x.ranking(x.scores().soft_or, per_rollout=True)


@register_rule("soft_or_bottom", paper_scope="rollout", counted_per_rollout=True)
def rule_soft_or_bottom(x: RuleInputs) -> Ranking:
    """Sanity check: lowest s, floor(rho * m) per rollout."""
    return x.ranking(-x.scores().soft_or, per_rollout=True)


@register_rule("q3")
def rule_q3(x: RuleInputs) -> Ranking:
    """Overconfident tokens: highest w = d_fwd (1 - h^)."""
    return x.ranking(x.scores().q3)


@register_rule("div_topk")
def rule_div_topk(x: RuleInputs) -> Ranking:
    """Highest reverse KL d."""
    return x.ranking(x.signals.reverse_kl.double())


@register_rule("quadrants")
def rule_quadrants(x: RuleInputs) -> Ranking:
    """The union of `keep_quadrants`; with rho < 1, at most floor(rho * m) by highest s."""
    union = torch.tensor(x.config.keep_quadrants, device=x.signals.device)
    eligible = torch.isin(x.labels(), union) & x.signals.response_mask
    if x.config.rho >= 1.0:  # uncapped: the key is never read, skip the scores
        return x.ranking(torch.zeros_like(x.signals.entropy_norm.double()), eligible=eligible)
    return x.ranking(x.scores().soft_or, eligible=eligible)


def _rollout_groups(signals: TokenSignals) -> torch.Tensor:
    return torch.unique(signals.rollout_ids, return_inverse=True)[1]


def _check_stats(config: SelectionConfig, norm_stats: Optional[NormStats]) -> None:
    if norm_stats is not None and norm_stats.scope != config.effective_scope:
        raise ValueError(f"norm_stats have scope {norm_stats.scope!r}, "
                         f"selection.scope is {config.effective_scope!r}")


def selection_labels(
    config: SelectionConfig, signals: TokenSignals, norm_stats: Optional[NormStats] = None
) -> torch.Tensor:
    """`[tokens]` quadrant labels under `config.quadrant_rule`. A `quantile` rule needs the
    statistics of the effective scope: computed here for `rollout` / `microbatch` when
    `norm_stats` is None; scope `global` must pass `global_norm_stats(...)` (the pre-pass)."""
    rule = config.quadrant_rule
    if rule.split_quantiles is None:
        return quadrant_labels(signals, rule)
    if norm_stats is None:
        if config.effective_scope == "global":
            raise ValueError("selection.quadrant_rule.kind='quantile' with scope 'global' needs "
                             "the pre-pass's global_norm_stats")
        norm_stats = compute_norm_stats(signals, config.effective_scope,
                                        split_quantiles=rule.split_quantiles)
    _check_stats(config, norm_stats)
    return quadrant_labels(signals, rule, norm_stats)


def select(
    config: SelectionConfig, signals: TokenSignals, *, step: int = 0,
    norm_stats: Optional[NormStats] = None,
) -> torch.Tensor:
    """`[tokens]` bool kept mask of one micro-batch. Pure: inputs are not modified.

    Scopes `rollout` and `microbatch` compute their statistics here when `norm_stats` is
    None. Scope `global` takes `norm_stats` from `global_norm_stats` and supports rules
    counted per rollout (soft_or, soft_or_bottom) or not counted (all, uncapped
    quadrants); the others count over the global batch: use `select_global`.
    """
    _check_stats(config, norm_stats)
    ranking = RULES[config.rule](RuleInputs(signals, config, step, norm_stats))
    if ranking.fraction >= 1.0:
        return ranking.eligible & signals.response_mask
    if ranking.per_rollout or config.effective_scope == "rollout":
        group = _rollout_groups(signals)
    elif config.effective_scope == "microbatch":
        group = torch.zeros(signals.num_tokens, dtype=torch.int64, device=signals.device)
    else:
        raise ValueError(f"rule {config.rule!r} with scope 'global' counts over the global "
                         "batch: use select_global")
    return keep_top(ranking, signals, group, config.min_keep)


def select_global(
    config: SelectionConfig, parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], *, step: int = 0,
) -> list[torch.Tensor]:
    """Kept masks of this rank's micro-batches `parts` under scope `global`.

    Run in the scoring pre-pass, on every DP rank of `dp_group` (None: no DP), with the
    signals of all of this rank's micro-batches of the step, and the same `step` on every
    rank. Collectives: those of `global_norm_stats`, plus, for rules counted over the
    group, an all-gather of the eligible tokens' keys. Same masks as one process selecting
    over the concatenation.
    """
    return select_global_with_stats(config, parts, dp_group, step=step)[0]


def select_global_with_stats(
    config: SelectionConfig, parts: Sequence[TokenSignals],
    dp_group: Optional[dist.ProcessGroup], *, step: int = 0,
) -> tuple[list[torch.Tensor], NormStats]:
    """`select_global`, also returning the global `NormStats` it used (for the labels of a
    `quantile` quadrant rule, see `selection_labels`)."""
    if config.effective_scope != "global":
        raise ValueError("select_global needs an effective selection.scope='global', got "
                         f"{config.effective_scope!r}")
    split_quantiles = config.quadrant_rule.split_quantiles
    stats = global_norm_stats(parts, dp_group, split_quantiles=split_quantiles)
    rankings = [RULES[config.rule](RuleInputs(p, config, step, stats)) for p in parts]
    if rankings[0].fraction >= 1.0:
        return [r.eligible & p.response_mask for r, p in zip(rankings, parts)], stats
    if rankings[0].per_rollout:
        return [keep_top(r, p, _rollout_groups(p), config.min_keep)
                for r, p in zip(rankings, parts)], stats
    return keep_top_global(rankings, parts, dp_group, config.min_keep), stats

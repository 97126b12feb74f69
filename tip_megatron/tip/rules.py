"""TIP selection rules, registered by name, and their config (`tip.selection` applies them).

Shapes: `[tokens]` for one micro-batch (sequences flattened in order).

    config = SelectionConfig(rule="soft_or", rho=0.5)
    kept_mask = select(config, signals, step=step)                  # rollout / microbatch
    kept_masks = select_global(config, microbatches, dp_group, step=step)   # global scope

A rule is a pure function `RuleInputs -> Ranking` (a key per token, which tokens are
eligible, the fraction to keep and the counting unit, and for a weighted rule a weight per
token in [0, 1]); `select` keeps the top tokens.
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
from typing import Callable, Optional

import torch

from tip_megatron.tip.quadrants import QUADRANTS, QuadrantRule, quadrant_labels
from tip_megatron.tip.ranking import Ranking, rollout_uniforms
from tip_megatron.tip.scores import (
    SCOPES, NormStats, Scores, check_scope, compute_norm_stats, compute_scores, global_norm_stats,
)
from tip_megatron.tip.signals import OPTIONAL_SIGNALS, TokenSignals

NORMALIZE_MODES = ("batch", "running", "absolute")
"""`SelectionConfig.normalize` (tip/normalize.py)."""

RuleFn = Callable[["RuleInputs"], Ranking]
RULES: dict[str, RuleFn] = {}
PAPER_SCOPES: dict[str, str] = {}
"""rule -> the scope `selection.scope=auto` resolves to (the paper's reading of the rule)."""
COUNTED_PER_ROLLOUT: set[str] = set()
"""Rules whose Ranking counts per rollout whatever the scope (Soft-OR, Soft-OR-bottom)."""
AUTO_SCOPE = "auto"
PREPASS_SOURCES = ("auto", "recompute", "generation")
"""Where the scoring pre-pass reads the student's hidden states (`SelectionConfig.prepass_source`)."""


RULE_RESOLVERS: list[Callable[[str, str], None]] = []
"""Called with (rule, key prefix) for a rule name by import path (`module:function`) that
is not registered yet; `tip.user_rules` adds its loader here (tip/__init__ imports it)."""
WEIGHTED_RULES: set[str] = set()
"""Rules whose Ranking carries per-token weights in [0, 1] (not only a kept mask)."""
WHOLE_RULES: set[str] = set()
"""Rules that weigh every response token and count nothing: rho must be 1.0."""
RULE_SIGNALS: dict[str, tuple[str, ...]] = {}
"""rule -> the optional signals it reads (`tip.signals.OPTIONAL_SIGNALS`), scored for it."""


def register_rule(
    name: str, paper_scope: str = "global", counted_per_rollout: bool = False,
    weighted: bool = False, signals: tuple[str, ...] = (), counted: bool = True,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator: make `fn` selectable as `SelectionConfig(rule=name)`; `paper_scope` is
    the scope used under `selection.scope=auto` (`rollout`, `microbatch` or `global`);
    `counted_per_rollout` declares that `fn` returns `Ranking(per_rollout=True)`;
    `weighted` that it returns `Ranking(weights=...)`; `signals` the optional signals it
    reads; `counted=False` that it keeps every response token (rho must be 1.0)."""
    check_scope(paper_scope)
    unknown = set(signals) - set(OPTIONAL_SIGNALS)
    if unknown:
        raise ValueError(f"rule {name!r}: unknown signals {sorted(unknown)}; known: {list(OPTIONAL_SIGNALS)}")

    def wrap(fn: RuleFn) -> RuleFn:
        if name in RULES:
            raise ValueError(f"selection rule {name!r} is already registered")
        RULES[name] = fn
        PAPER_SCOPES[name] = paper_scope
        RULE_SIGNALS[name] = tuple(signals)
        if counted_per_rollout:
            COUNTED_PER_ROLLOUT.add(name)
        if weighted:
            WEIGHTED_RULES.add(name)
        if not counted:
            WHOLE_RULES.add(name)
        return fn
    return wrap


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unit(value: object) -> bool:
    """A number in [0, 1]."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0.0 <= value <= 1.0)


@dataclass(frozen=True)
class SelectionConfig:
    """Which tokens the student learns from. Validated on construction."""

    rule: str = "all"
    """Registered rule name: all, random, entropy_sample, entropy_topk, soft_or,
    soft_or_bottom, q3, div_topk, quadrants; the 2026 rules teachability, propose_verify,
    tip_soft; or a user rule by import path `package.module:function` (docs/tip.md,
    "Writing a rule": checked on a probe batch when the config is built)."""
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
    prepass_source: str = "auto"
    """Where the scoring pre-pass of an effective scope `global` gets the student's final
    hidden states: `recompute` (a forward-only student pass over the rollouts, the training
    pass's own forward code; any number of updates), `generation` (the ones the generation
    engine computed while sampling: same weights, no second student forward; kept on the
    last pipeline stage, [response tokens, h] per DP rank in the compute dtype, released
    once scored) or `auto` (the default): in a run, `generation` wherever it scores with the
    weights that will be trained (train.updates_per_rollout=1, or rescore_each_update=false),
    else `recompute` (config.run_selection); a SelectionConfig used outside a run reads
    `auto` as `recompute`. `generation` is refused with train.updates_per_rollout > 1 and
    rescore_each_update=true. Signals differ from `recompute` by kernel rounding only
    (docs/tip.md). With an effective scope that has no pre-pass (`rollout`, `microbatch`)
    it does nothing: nothing is kept."""
    quadrant_rule: QuadrantRule = field(default_factory=QuadrantRule)
    """How quadrants are labeled (rule `quadrants` and the metrics)."""
    keep_quadrants: tuple[int, ...] = (1, 3)
    """Rule `quadrants`: the union of quadrants kept (1..4); ranked by Soft-OR s under a cap."""
    top_k: int = 8
    """Rule `teachability`: K, the student's candidates whose teacher mass is the score."""
    threshold: Optional[float] = None
    """Rule `teachability`: also require score >= this (in [0, 1]); null: top-rho only."""
    verify_top_k: int = 1
    """Rule `propose_verify`: the teacher accepts the sampled token when it is among the
    teacher's `verify_top_k` most likely (1: the teacher's argmax)."""
    reject_weight: float = 0.5
    """Rule `propose_verify`: weight beta of a rejected token, in [0, 1] (0: masked);
    accepted tokens weigh 1."""
    quadrant_weights: tuple[float, ...] = (1.0, 0.5, 1.0, 0.25)
    """Rule `tip_soft`: the weight of a Q1, Q2, Q3, Q4 token (each in [0, 1]), labels by
    `quadrant_rule`."""
    normalize: str = "batch"
    """How h^ and d^ are scaled (rules soft_or, soft_or_bottom, q3, capped quadrants;
    tip/normalize.py): `batch` (the paper: 98th-percentile clip and min-max within the
    group), `running` (the clip and min/max from a moving average over steps, saved in the
    checkpoint; needs an effective scope `global`) or `absolute` (h^ = h, d^ = 1 - exp(-d):
    no batch statistics)."""
    normalize_decay: float = 0.9
    """`running`: weight of the previous average, in [0, 1) (0: this step's batch only)."""
    budget_per_teacher: bool = False
    """Several teachers (`teachers:`): count rho within each teacher's tokens of a count
    group (floor(rho x m_t) per teacher) instead of over the group as a whole, so one
    teacher's disagreements cannot take the whole budget. Scopes `microbatch` and `global`;
    per-rollout counting is per teacher already (docs/teacher.md, "Several teachers")."""

    def __post_init__(self) -> None:
        self.validate()  # built directly by the engine and tests too, not only from a config

    def validate(self, prefix: str = "selection.") -> None:
        """ValueError naming `<prefix><field>` and what is accepted."""
        if isinstance(self.rule, str) and ":" in self.rule and self.rule not in RULES:
            for resolve in RULE_RESOLVERS:  # tip.user_rules: load, probe and register it
                resolve(self.rule, prefix)
        if self.rule not in RULES:
            raise ValueError(f"{prefix}rule={self.rule!r}: registered rules are {sorted(RULES)}, "
                             "or a function by import path 'package.module:function'")
        rho_ok = isinstance(self.rho, (int, float)) and not isinstance(self.rho, bool)
        if not rho_ok or not math.isfinite(self.rho) or not 0.0 < self.rho <= 1.0:
            raise ValueError(f"{prefix}rho={self.rho!r}: must be in (0, 1]")
        if (self.rule == "all" or self.rule in WHOLE_RULES) and self.rho != 1.0:
            raise ValueError(f"{prefix}rho={self.rho!r}: rule {self.rule!r} keeps (weighs) every "
                             "token; use rho=1.0")
        if self.scope != AUTO_SCOPE and self.scope not in SCOPES:
            raise ValueError(f"{prefix}scope={self.scope!r}: accepted values are "
                             f"{[AUTO_SCOPE, *SCOPES]}")
        if not isinstance(self.budget_per_teacher, bool):
            raise ValueError(f"{prefix}budget_per_teacher={self.budget_per_teacher!r}: must be true or false")
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
        self._validate_weighted(prefix)
        self._validate_normalize(prefix)
        if not isinstance(self.quadrant_rule, QuadrantRule):
            raise ValueError(f"{prefix}quadrant_rule: must be a QuadrantRule")
        self.quadrant_rule.validate(f"{prefix}quadrant_rule.")

    def _validate_weighted(self, prefix: str) -> None:
        """The keys of the teachability, propose_verify and tip_soft rules."""
        for name in ("top_k", "verify_top_k"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{prefix}{name}={value!r}: must be an integer >= 1")
        if self.threshold is not None and not _unit(self.threshold):
            raise ValueError(f"{prefix}threshold={self.threshold!r}: must be null or in [0, 1]")
        if not _unit(self.reject_weight):
            raise ValueError(f"{prefix}reject_weight={self.reject_weight!r}: must be in [0, 1]")
        weights = self.quadrant_weights
        if (not isinstance(weights, (tuple, list)) or len(weights) != 4
                or not all(_unit(w) for w in weights)):
            raise ValueError(f"{prefix}quadrant_weights={weights!r}: four weights in [0, 1] "
                             "(Q1, Q2, Q3, Q4)")

    def _validate_normalize(self, prefix: str) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"{prefix}normalize={self.normalize!r}: accepted values are {list(NORMALIZE_MODES)}")
        d = self.normalize_decay
        if not _unit(d) or d >= 1.0:
            raise ValueError(f"{prefix}normalize_decay={d!r}: must be in [0, 1)")
        if self.normalize == "running" and self.effective_scope != "global":
            raise ValueError(f"{prefix}normalize='running' averages the global batch's statistics over "
                             f"steps: it needs {prefix}scope='global' (rule {self.rule!r} resolves to "
                             f"{self.effective_scope!r})")

    @property
    def weighted(self) -> bool:
        """Whether the rule returns per-token weights (then the loss is weighted)."""
        return self.rule in WEIGHTED_RULES

    @property
    def signals_needed(self) -> tuple[str, ...]:
        """The optional signals (`tip.signals.OPTIONAL_SIGNALS`) the rule reads."""
        return RULE_SIGNALS.get(self.rule, ())

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
        return compute_scores(self.signals, self.stats(), self.config.normalize)

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

"""TIP token selection: per-token signals -> normalized scores, quadrants -> kept mask.

Pure functions on `[tokens]` statistics; no model, no megatron. See docs/tip.md.
"""
from tip_megatron.tip.metrics import (
    METRIC_SUM_KEYS, all_reduce_metric_sums, finalize, selection_metric_sums, sum_metric_sums,
)
from tip_megatron.tip.quadrants import QUADRANT_KINDS, Quadrant, QuadrantRule, quadrant_labels
from tip_megatron.tip.rules import (
    AUTO_SCOPE, PAPER_SCOPES, RULES, RuleInputs, SelectionConfig, register_rule, selection_labels,
)
from tip_megatron.tip import rules_weighted  # noqa: F401  (registers the weighted rules)
from tip_megatron.tip import user_rules  # noqa: F401  (resolves rules named by import path)
from tip_megatron.tip.selection import (
    select, select_global, select_global_weighted, select_global_with_stats, select_weighted,
)
from tip_megatron.tip.budget import budget_message, warn_ill_posed_budget
from tip_megatron.tip.scores import (
    ENTROPY_CLIP_QUANTILE, SCOPES, NormStats, Scores, compute_norm_stats, compute_scores,
    global_norm_stats, quantile_per_group,
)
from tip_megatron.tip.signals import TokenSignals, concat_signals

__all__ = [
    "AUTO_SCOPE", "PAPER_SCOPES", "budget_message", "select_global_with_stats",
    "select_global_weighted", "select_weighted", "selection_labels", "warn_ill_posed_budget", "ENTROPY_CLIP_QUANTILE", "METRIC_SUM_KEYS", "QUADRANT_KINDS", "RULES", "SCOPES",
    "NormStats", "Quadrant", "QuadrantRule", "RuleInputs", "Scores", "SelectionConfig",
    "TokenSignals", "all_reduce_metric_sums", "compute_norm_stats", "compute_scores",
    "concat_signals", "finalize", "global_norm_stats", "quadrant_labels",
    "quantile_per_group", "register_rule", "select", "select_global",
    "selection_metric_sums", "sum_metric_sums",
]

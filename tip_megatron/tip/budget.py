"""Is the selection budget well posed? floor(rho * m) per count group, compared with rho.

Shapes: `group_sizes` is `[groups]` int64, the response tokens m of each count group (a
rollout, a micro-batch or the global batch, see `SelectionConfig.count_unit`).

With no hidden minimum (`min_keep=0`), a count group with rho * m < 1 keeps nothing: e.g.
Q3 at rho=0.1 counted per rollout over 4-token rollouts keeps no token at all. The run is
then not the rule at rho it claims to be, so the trainer warns once with the numbers.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from tip_megatron.tip.ranking import counts_to_keep
from tip_megatron.tip.rules import SelectionConfig

logger = logging.getLogger(__name__)
_WARNED: set[tuple] = set()

ILL_POSED_SHARE = 0.5
"""Warn when the budget keeps less than this share of rho, or more than this share of the
non-empty groups keep nothing."""


def budget_message(config: SelectionConfig, group_sizes: torch.Tensor) -> Optional[str]:
    """A one-paragraph warning when floor(rho * m) per group misses rho badly, else None."""
    unit = config.count_unit
    sizes = group_sizes[group_sizes > 0].long()
    if unit is None or sizes.numel() == 0:
        return None
    kept = counts_to_keep(config.rho, sizes, config.min_keep)
    share = float(kept.sum()) / float(sizes.sum())
    num_zero = int((kept == 0).sum())
    if share >= ILL_POSED_SHARE * config.rho and num_zero <= ILL_POSED_SHARE * sizes.numel():
        return None
    fix = ("use selection.scope=global (count over the global batch), a larger rho, or "
           "selection.min_keep" if unit != "global" else "use a larger rho or a larger batch")
    return (f"selection: rule={config.rule} rho={config.rho} counts floor(rho * m) per "
            f"{unit}: {num_zero} of {sizes.numel()} {unit} groups (m = {int(sizes.min())}.."
            f"{int(sizes.max())} response tokens) keep no token, so the step keeps "
            f"{share:.1%} of its response tokens instead of {config.rho:.1%}; {fix}")


def warn_ill_posed_budget(config: SelectionConfig, group_sizes: torch.Tensor) -> Optional[str]:
    """Log `budget_message` once per (rule, rho, scope, min_keep) in this process."""
    message = budget_message(config, group_sizes)
    key = (config.rule, config.rho, config.effective_scope, config.min_keep)
    if message is None or key in _WARNED:
        return None
    _WARNED.add(key)
    logger.warning(message)
    return message

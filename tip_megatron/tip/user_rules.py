"""User selection rules loaded by import path: `selection.rule: my_pkg.rules:my_rule`.

Shapes: every tensor `[tokens]` (one micro-batch, sequences flattened in order).

The contract (docs/tip.md, "Writing a rule"): a pure function

    def my_rule(signals: TokenSignals, *, seed: int, step: int) -> torch.Tensor

returning one float weight in [0, 1] per token (a mask is the special case 0/1), finite,
the same for the same (signals, seed, step), never modifying its inputs, and depending on
a token only through that token's rollout (so that it does not depend on how rollouts are
packed into micro-batches or DP ranks). Weights outside the response are ignored (set to 0);
weight-0 tokens are dropped before the LM head. The function may declare the optional
signals it reads as an attribute, `my_rule.signals = ("teacher_rank",)` (see
`tip.signals.OPTIONAL_SIGNALS`; `teacher_entropy` is always there).

Before any training, `register_user_rule` imports it and checks it on a probe batch: the
output's shape, dtype, finiteness and range, determinism (called twice), no mutation of the
inputs, and the same per-token weights when the probe's rollouts are split into two
micro-batches with other padding. Any failure is one ValueError line naming the rule and
what is wrong. A rule that passes is registered as a weighted rule of scope `rollout` that
weighs every response token (rho must be 1.0).
"""
from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Callable

import torch

from tip_megatron.tip.ranking import Ranking
from tip_megatron.tip.rules import RULE_RESOLVERS, RULES, RuleInputs, register_rule
from tip_megatron.tip.signals import OPTIONAL_SIGNALS, TokenSignals, response_index

UserRuleFn = Callable[..., torch.Tensor]


def is_user_rule(name: str) -> bool:
    """Whether `selection.rule` names a function by import path (`module:function`)."""
    return ":" in name


def load_user_rule(path: str, prefix: str = "selection.") -> UserRuleFn:
    """The function `module:function` names; ValueError (one line) when it cannot be loaded."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{prefix}rule={path!r}: a user rule is 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure of user code is the user's to fix
        raise ValueError(f"{prefix}rule={path!r}: cannot import {module_name!r} "
                         f"({type(err).__name__}: {err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{prefix}rule={path!r}: {module_name!r} has no function {attr!r}")
    unknown = set(getattr(fn, "signals", ())) - set(OPTIONAL_SIGNALS)
    if unknown:
        raise ValueError(f"{prefix}rule={path!r}: declares unknown signals {sorted(unknown)}; "
                         f"known: {list(OPTIONAL_SIGNALS)}")
    return fn


def _probe_rollouts(seed: int = 0) -> list[tuple[int, int, dict]]:
    """(rollout id, prompt length, {signal: [m] values}) of a small deterministic batch."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rid in (3, 7, 11, 12, 20, 31):
        m = int(torch.randint(2, 14, (1,), generator=gen))
        values = {"entropy_norm": torch.rand(m, generator=gen, dtype=torch.float64) ** 3,
                  "reverse_kl": torch.rand(m, generator=gen, dtype=torch.float64) * 2,
                  "forward_kl": torch.rand(m, generator=gen, dtype=torch.float64) * 2,
                  "teacher_entropy": torch.rand(m, generator=gen, dtype=torch.float64),
                  "teachability": torch.rand(m, generator=gen, dtype=torch.float64),
                  "teacher_rank": torch.randint(0, 5, (m,), generator=gen).double()}
        out.append((rid, 1 + rid % 3, values))
    return out


def _pack(rollouts: list, pad_to: int) -> TokenSignals:
    """One micro-batch of [prompt | response | padding] rows; filler values off the response."""
    cols: dict[str, list] = {f.name: [] for f in fields(TokenSignals)}
    for rid, prompt, values in rollouts:
        m = next(iter(values.values())).numel()
        pad = pad_to - prompt - m
        for name, v in values.items():
            cols[name].append(torch.cat([torch.full((prompt,), 9.0, dtype=torch.float64), v,
                                         torch.full((pad,), 9.0, dtype=torch.float64)]))
        cols["response_mask"].append(torch.cat([torch.zeros(prompt, dtype=torch.bool),
                                                torch.ones(m, dtype=torch.bool),
                                                torch.zeros(pad, dtype=torch.bool)]))
        cols["rollout_ids"].append(torch.full((pad_to,), rid, dtype=torch.int64))
    cols["entropy_norm"] = [c.clamp(0.0, 1.0) for c in cols["entropy_norm"]]
    return TokenSignals(**{k: torch.cat(v) for k, v in cols.items() if v})  # teacher_ids: none


def _call(fn: UserRuleFn, path: str, signals: TokenSignals, seed: int, step: int) -> torch.Tensor:
    """The rule's weights on `signals`, checked for type, shape, finiteness and range."""
    try:
        w = fn(signals, seed=seed, step=step)
    except Exception as err:  # user code: report what it raised, in one line
        raise ValueError(f"selection.rule={path!r}: raised {type(err).__name__}: {err}") from None
    n = signals.num_tokens
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"selection.rule={path!r}: must return a float tensor, got "
                         f"{type(w).__name__}{'' if not isinstance(w, torch.Tensor) else ' ' + str(w.dtype)}")
    if tuple(w.shape) != (n,):
        raise ValueError(f"selection.rule={path!r}: must return [tokens] = [{n}] weights, "
                         f"got shape {tuple(w.shape)}")
    w = torch.where(signals.response_mask, w.double(), 0.0)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"selection.rule={path!r}: returned NaN or inf weights")
    if bool(((w < 0) | (w > 1)).any()):
        raise ValueError(f"selection.rule={path!r}: weights must be in [0, 1], got "
                         f"[{float(w.min()):.4g}, {float(w.max()):.4g}]")
    return w


def _by_token(signals: TokenSignals, w: torch.Tensor) -> dict:
    index = response_index(signals)
    resp = signals.response_mask
    return dict(zip(zip(signals.rollout_ids[resp].tolist(), index[resp].tolist()), w[resp].tolist()))


def check_user_rule(fn: UserRuleFn, path: str) -> None:
    """The probe checks of the module docstring; ValueError (one line) on the first failure."""
    rollouts = _probe_rollouts()
    whole = _pack(rollouts, pad_to=20)
    present = [f.name for f in fields(TokenSignals) if getattr(whole, f.name) is not None]
    before = [getattr(whole, name).clone() for name in present]
    first = _call(fn, path, whole, seed=5, step=3)
    if not all(torch.equal(b, getattr(whole, name)) for b, name in zip(before, present)):
        raise ValueError(f"selection.rule={path!r}: modified its input signals (a rule must be pure)")
    if not torch.equal(first, _call(fn, path, whole, seed=5, step=3)):
        raise ValueError(f"selection.rule={path!r}: not deterministic (two calls with the same "
                         "signals, seed and step differ)")
    split = {}
    for part in (rollouts[:2][::-1] + rollouts[4:5], rollouts[2:4] + rollouts[5:]):
        sig = _pack(part, pad_to=23)
        split.update(_by_token(sig, _call(fn, path, sig, seed=5, step=3)))
    if split != _by_token(whole, first):
        raise ValueError(f"selection.rule={path!r}: weights change when the rollouts are split "
                         "into micro-batches differently (a token's weight may depend only on "
                         "its own rollout)")


def register_user_rule(path: str, prefix: str = "selection.") -> None:
    """Load, check and register `path` (once per process)."""
    if path in RULES:
        return
    fn = load_user_rule(path, prefix)
    check_user_rule(fn, path)

    def rule(x: RuleInputs) -> Ranking:
        w = _call(fn, path, x.signals, x.config.seed, x.step)  # the same checks on every batch
        return x.ranking(torch.zeros_like(w), fraction=1.0, weights=w)

    register_rule(path, paper_scope="rollout", weighted=True, counted=False,
                  signals=tuple(getattr(fn, "signals", ())))(rule)


RULE_RESOLVERS.append(register_user_rule)

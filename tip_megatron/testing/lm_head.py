"""Count the output layer's matmuls ([tokens, V/tp] products) while a step runs.

    with LMHeadCounter(widths=(valid_width, shard_width), hidden=(h_s, h_t)) as count:
        train_pass(...)
    count.rows  # {"logits": 2 n + ..., "grad_hidden": k, "grad_weight": k}

Every matrix product (aten mm / addmm, out= and in-place forms included) is classified by
its shapes: a product whose output has `widths` columns computes logits (one row per
token); one whose left operand has `widths` columns and whose output has a `hidden` width
is the hidden state's gradient g @ W (one row per token); one whose output has `widths`
rows and a `hidden` width is the weight's gradient g^T @ hidden (its inner dimension = the
tokens). `rows[kind]` sums the tokens over the step; `calls[kind]` counts the products.
Choose model sizes whose other matmuls never have these widths (tiny_arch's vocabulary of
250 is one). Single thread of the caller (a TorchDispatchMode).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MM = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
       torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default}


class LMHeadCounter(TorchDispatchMode):
    """Rows of [tokens, V/tp] products per kind (module docstring)."""

    def __init__(self, widths: tuple[int, ...], hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.widths, self.hidden = set(widths), set(hidden)
        self.rows: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MM:
            left, right = (args[0], args[1]) if func in (torch.ops.aten.mm.default,
                                                       torch.ops.aten.mm.out) else (args[1], args[2])
            self._classify(left.shape, right.shape)
        return out

    def _classify(self, left: torch.Size, right: torch.Size) -> None:
        rows, cols = left[0], right[1]
        if cols in self.widths and left[1] in self.hidden:
            kind, tokens = "logits", rows
        elif left[1] in self.widths and cols in self.hidden:
            kind, tokens = "grad_hidden", rows
        elif rows in self.widths and cols in self.hidden:
            kind, tokens = "grad_weight", left[1]
        else:
            return
        self.rows[kind] += int(tokens)
        self.calls[kind] += 1

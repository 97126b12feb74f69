"""CUDA graph of the static engine's decode step (`GenerationConfig.cuda_graph`).

NOT RUN ON A GPU YET (written on a CPU-only machine; tests/gpu/test_generate_gpu.py holds
the graph == eager check, skipped without CUDA).

Shapes: tokens / positions [B, 1], allowed [B, 1, 1, max_len] bool, logits [B, V/tp].

A graph replays the kernels of one captured forward on the same addresses, so every
input and every buffer it touches must keep its shape and address from step to step:
- the batch is fixed (the static engine decodes every row to the end);
- `GraphKVCache` keeps full-length [B, ng, max_len, hn] buffers (allocated zeroed at the
  prefill, so the masked columns beyond the current one hold zeros, never NaN), writes a
  decode step's keys at the column held in a [1] device tensor (`index_copy_`), and hands
  attention all max_len columns; the mask is full length with the columns after the
  current one masked out (the same keys as the eager step's mask, so the same tokens);
- the step's inputs (tokens, positions, mask, column) are copied into static tensors
  before each replay; the logits are read from the graph's static output.
Only the forward is captured; sampling (its collectives, the stop test) stays eager.
Scope, refused with one line otherwise: engine `static`, KV cache on, pipeline size 1
(p2p send/recv are not captured), functional layers (megatron's layer wrappers carry
their own CUDA-graph hooks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tip_megatron.rollout.kv_cache import KVCache


def check_supported(config, device: torch.device, pp_size: int, impl: str) -> None:
    """ValueError naming `cuda_graph` and what it needs, before any forward."""
    if not config.cuda_graph:
        return
    if torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graph=True: CUDA graphs need a CUDA device; this run is on "
                         f"{torch.device(device).type} (use cuda_graph=False)")
    if pp_size != 1:
        raise ValueError(f"cuda_graph=True: supported with pipeline size 1 only (got pp={pp_size})")
    if impl != "functional":
        raise ValueError(f"cuda_graph=True: needs the functional layers (layer_impl resolved to {impl!r})")


def full_length_mask(allowed: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, 1, 1, start + 1] decode-step mask -> [B, 1, 1, max_len]: the columns after the
    current one (not yet written) masked out."""
    return F.pad(allowed, (0, max_len - allowed.shape[-1]), value=False)


@dataclass
class GraphKVCache(KVCache):
    """`KVCache` with fixed addresses for graphed decode steps: zero-filled full-length
    buffers; with `column` set, a step writes that column and attends over all columns."""

    column: Optional[torch.Tensor] = None
    """[1] int64 device tensor: the column a graphed decode step writes; None = eager."""

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if slot not in self.buffers:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.buffers[slot] = (k.new_zeros(shape), v.new_zeros(shape))
        if self.column is None:
            return super().update(slot, k, v)
        k_buf, v_buf = self.buffers[slot]
        k_buf.index_copy_(2, self.column, k)
        v_buf.index_copy_(2, self.column, v)
        return k_buf, v_buf


class GraphedStep:
    """`step(tokens, positions) -> logits` captured once, replayed for every later step.

    `step` reads the cache's mask (`cache.allowed`) and column (`cache.column`): both are
    static tensors here, refreshed in place before each replay."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cache: GraphKVCache,
                 warmup: int = 2, capture: bool = True):
        # capture=False runs the same static-buffer step eagerly: the CPU tests' check of
        # the full-length cache and mask (generate() refuses cuda_graph off CUDA).
        self.step, self.cache, self.warmup, self.capture = step, cache, warmup, capture
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.logits: Optional[torch.Tensor] = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                 column: int) -> torch.Tensor:
        fresh = dict(tokens=tokens, positions=positions, allowed=allowed,
                     column=torch.tensor([column], dtype=torch.long, device=tokens.device))
        if not self.capture:
            self.inputs = {name: value.clone() for name, value in fresh.items()}
            return self._run()
        if self.graph is None:
            self._capture(fresh)
        else:
            for name, value in fresh.items():
                self.inputs[name].copy_(value)
        self.graph.replay()
        return self.logits

    def _run(self) -> torch.Tensor:
        self.cache.set_window(int(self.cache.start), self.inputs["allowed"])
        self.cache.column = self.inputs["column"]
        return self.step(self.inputs["tokens"], self.inputs["positions"])

    def _capture(self, fresh: dict) -> None:
        self.inputs = {name: value.clone() for name, value in fresh.items()}
        # Warm-up on a side stream (lazy allocations, cuBLAS workspaces) as torch's docs
        # ask; each writes this step's keys at this step's column: the same values the
        # replay writes, so repeating them changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

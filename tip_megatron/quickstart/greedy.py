"""Greedy decoding of the task's 4 answer tokens, for accuracy evaluation.

Shapes: prompts [n, 8]; tokens [b, s] (s grows 8 -> 11); logits [b, s, V/tp]
(vocab-parallel shard, last pipeline stage); answers [n, 4].

Each new token is one forward-only pass of megatron's pipeline schedule over the whole
sequence so far (no KV cache: 4 passes of at most 11 tokens cost less than a cache's
bookkeeping; OPD rollouts use the generation engine instead). On the last stage the next
token is the argmax over the TRUE vocabulary, found without gathering it:
`vocab_parallel_sample` at temperature 0 takes each shard's argmax and all-gathers
(value, global id) over the TP group, lowest id on ties, so every TP rank picks the same
token and TP = 1 and TP = 2 agree. The last stage then broadcasts the ids to the other
pipeline stages, so every rank of the model-parallel group returns the same answers.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from tip_megatron import pipeline, platform
from tip_megatron.models import ModelArch
from tip_megatron.ops.sampling import vocab_parallel_sample
from tip_megatron.parallel import ParallelGroups
from tip_megatron.quickstart import task


@contextlib.contextmanager
def _eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)


def _forward_step(arch: ModelArch, tp_group, data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = model(tokens, positions, None)  # causal mask from the layer spec
    return output, partial(_pick_next, arch, tp_group)


def _pick_next(arch: ModelArch, tp_group, logits: torch.Tensor):
    """Megatron's loss contract, used to carry the greedy ids out of the schedule."""
    ids, _ = vocab_parallel_sample(logits[:, -1, :], tp_group=tp_group,
                                   vocab_size=arch.vocab_size, temperature=0.0, seed=0)
    return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {"ids": ids}


def _next_tokens(chunks, groups: ParallelGroups, arch: ModelArch, tokens: torch.Tensor):
    """[b, s] -> [b] greedy next ids on every rank of the model-parallel group."""
    reports = pipeline.forward_backward(
        partial(_forward_step, arch, groups.tp_group), chunks, [tokens], groups,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
    )
    ids = reports[0]["ids"] if reports else torch.empty(tokens.shape[0], dtype=torch.long,
                                                        device=tokens.device)
    if groups.pp_size > 1:
        last = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
        dist.broadcast(ids, src=last, group=groups.pp_group)
    return ids


def greedy_answers(
    chunks: Sequence[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    prompts: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """[n, 8] prompts -> [n, 4] greedy answer ids, at any TP/PP layout. Every rank of a
    model-parallel group passes the same prompts and gets the same answers. `chunks` may
    be DDP-wrapped; their train/eval mode is restored."""
    device = platform.current_device()
    out = []
    with _eval_mode(chunks):
        for rows in prompts.split(batch_size):
            tokens = rows.to(device)
            for _ in range(task.ANSWER_LEN):
                ids = _next_tokens(chunks, groups, arch, tokens)
                tokens = torch.cat([tokens, ids.unsqueeze(1)], dim=1)
            out.append(tokens[:, task.PROMPT_LEN:].cpu())
    return torch.cat(out)


def evaluate(
    chunks: Sequence[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    n: int = 2000,
) -> dict:
    """Greedy exact match on `n` hold-out problems: `task.accuracy_report` keys (`exact`,
    `A`, `B`, `clean`, `student_rule`, `n`). Every rank decodes the same set."""
    prompts = task.eval_set(n)
    return task.accuracy_report(prompts, greedy_answers(chunks, groups, arch, prompts))

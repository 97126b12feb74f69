"""Greedy decoding of the task's 4 answer tokens, for accuracy evaluation.

Shapes: prompts [n, 8]; tokens [b, s] (s grows 8 -> 11); logits [b, s, V/tp]
(vocab-parallel shard); answers [n, 4].

No KV cache: 4 full-sequence forwards of at most 11 tokens cost less than the bookkeeping
of a cache (the OPD rollouts use the generation engine instead). The next token is the
argmax over the TRUE vocabulary, found without gathering it: `vocab_parallel_sample` at
temperature 0 takes each shard's argmax and all-gathers (value, global id) over the TP
group, lowest id on ties, so every TP rank gets the same token and TP = 1 and TP = 2 agree.
Pipeline parallelism is not supported here (PP = 1).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from tip_megatron import platform
from tip_megatron.models import ModelArch
from tip_megatron.models.state import unwrap
from tip_megatron.ops.sampling import vocab_parallel_sample
from tip_megatron.parallel import ParallelGroups
from tip_megatron.quickstart import task


def check_pp1(groups: ParallelGroups, what: str) -> None:
    if groups.pp_size != 1:
        raise ValueError(f"{what} runs at pipeline-parallel size 1 (got pp={groups.pp_size}); "
                         "use tp and dp only")


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


def greedy_answers(
    chunks: Sequence[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    prompts: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """[n, 8] prompts -> [n, 4] greedy answer ids (every rank passes the same prompts and
    gets the same answers). `chunks` may be DDP-wrapped; train/eval mode is restored."""
    check_pp1(groups, "greedy decoding")
    model = unwrap(chunks[0])
    device = platform.current_device()
    out = []
    with _eval_mode([model]):
        for rows in prompts.split(batch_size):
            tokens = rows.to(device)
            for _ in range(task.ANSWER_LEN):
                positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
                logits = model(tokens, positions, None)  # causal mask from the layer spec
                ids, _ = vocab_parallel_sample(
                    logits[:, -1, :], tp_group=groups.tp_group, vocab_size=arch.vocab_size,
                    temperature=0.0, seed=0,
                )
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

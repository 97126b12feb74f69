"""Train/inference consistency: the sampled tokens' log-probs under the training forward.

Shapes: rollouts [B, L] right-padded; logits [b, L, V/tp] (vocab-parallel shard, last
pipeline stage); per-token log-probs [tokens].

The sampling engine (KV cache, functional layers, one new token per forward) and the
training forward (megatron's `GPTModel.forward` over the whole sequence, causal mask) are
the same weights under different kernels and shapes: their log-probs of a sampled token
differ only by float rounding. `logprob_gap` measures it on the rollouts themselves;
`sampled_logprobs` + `gap_stats` let a trainer measure it on the logits of its own
student pass, with the same truncation (temperature, top-k, top-p) as the sampler.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tip_megatron.runtime.device import current_device
from tip_megatron.models.state import unwrap
from tip_megatron.ops.sampling import vocab_parallel_logprob

#: Rows per training forward of the check: bounds the [rows, L, V/tp] logits it holds.
ROWS_PER_FORWARD = 4


def sampled_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, tp_group: Any, vocab_size: int,
                     config) -> torch.Tensor:
    """[tokens] float64 log-prob of `token_ids` [tokens] under the sampling distribution of
    `config` (a GenerationConfig) applied to `logits` [tokens, V/tp] (the logits that
    PREDICT each token, i.e. those of the previous position)."""
    return vocab_parallel_logprob(logits, token_ids, tp_group=tp_group, vocab_size=vocab_size,
                                  temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)


def gap_stats(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> dict:
    """{"max", "mean", "tokens"} of |train - rollout| over matching [tokens] log-probs."""
    gap = (train_logprobs.double() - rollout_logprobs.double()).abs()
    if gap.numel() == 0:
        return dict(max=0.0, mean=0.0, tokens=0)
    return dict(max=float(gap.max()), mean=float(gap.mean()), tokens=int(gap.numel()))


@torch.no_grad()
def logprob_gap(chunks, groups, arch, rollouts, config) -> dict:
    """Rerun `rollouts` through the training forward (GPTModel.forward on every stage, as
    the trainer runs it) and compare the sampled tokens' log-probs; identical on every rank
    of the model-parallel group."""
    chunks = [unwrap(c) for c in chunks]
    modes = [(m, m.training) for c in chunks for m in c.modules()]
    for chunk in chunks:
        chunk.eval()
    train, engine = [], []
    try:
        for start in range(0, rollouts.num_rows, ROWS_PER_FORWARD):
            rows = slice(start, start + ROWS_PER_FORWARD)
            logits = _training_forward(chunks, groups, arch, rollouts.token_ids[rows])
            if logits is None:
                continue
            mask = rollouts.response_mask[rows, 1:]  # token j+1 is predicted at position j
            ids = rollouts.token_ids[rows, 1:][mask]
            train.append(sampled_logprobs(logits[:, :-1][mask], ids, groups.tp_group,
                                          config.sample_vocab(arch.vocab_size), config))
            engine.append(rollouts.logprobs[rows, 1:][mask])
    finally:
        for module, mode in modes:
            module.training = mode
        for chunk in chunks:
            chunk.set_input_tensor(None)
    stats = torch.zeros(3, dtype=torch.float64, device=rollouts.token_ids.device)
    if groups.is_last_stage:
        s = gap_stats(torch.cat(train), torch.cat(engine))
        stats = torch.tensor([s["max"], s["mean"], s["tokens"]], dtype=torch.float64, device=stats.device)
    if groups.pp_size > 1:
        dist.broadcast(stats, group=groups.pp_group, group_src=groups.pp_size - 1)
    return dict(max=float(stats[0]), mean=float(stats[1]), tokens=int(stats[2]))


def _training_forward(chunks, groups, arch, token_ids: torch.Tensor):
    """[b, L, V/tp] logits of GPTModel.forward over `token_ids` [b, L] through the pipeline
    stages (last stage; None elsewhere), with sequence parallelism when the model has it
    on, as the trainer runs it: the sequence is padded at the end to a multiple of tp (the
    causal mask keeps the first L positions as they are) and stages pass [L/tp, b, h]."""
    length = token_ids.shape[1]
    sp = bool(chunks[0].config.sequence_parallel)
    if sp and length % groups.tp_size:
        token_ids = torch.nn.functional.pad(token_ids, (0, groups.tp_size - length % groups.tp_size))
    b, padded = token_ids.shape
    positions = torch.arange(padded, device=token_ids.device)[None, :].expand(b, padded)
    pp, rank = groups.pp_size, groups.pp_rank
    dtype = chunks[0].config.params_dtype
    out = None
    for v, chunk in enumerate(chunks):
        first = groups.is_first_stage and v == 0
        last = groups.is_last_stage and v == len(chunks) - 1
        if not first:
            shape = (padded // groups.tp_size if sp else padded, b, arch.hidden_size)
            received = torch.empty(shape, dtype=dtype, device=token_ids.device)
            dist.recv(received, group=groups.pp_group, group_src=(rank - 1) % pp)
            chunk.set_input_tensor(received)
        out = chunk(token_ids, positions, None)
        if not last:
            dist.send(out.to(dtype).contiguous(), group=groups.pp_group, group_dst=(rank + 1) % pp)
    return out[:, :length] if groups.is_last_stage else None


def gap_metrics(gap: dict, dp_group: Any) -> dict:
    """The trainer's metrics from this replica's `logprob_gap` {"max", "mean", "tokens"}:
    max and token-weighted mean over every data-parallel replica's response tokens."""
    device = current_device()
    top = torch.tensor([gap["max"]], dtype=torch.float64, device=device)
    sums = torch.tensor([gap["mean"] * gap["tokens"], gap["tokens"]], dtype=torch.float64, device=device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=dp_group)
        dist.all_reduce(sums, group=dp_group)
    return {"rollout/logprob_gap_max": float(top[0]),
            "rollout/logprob_gap_mean": float(sums[0] / sums[1]) if sums[1] > 0 else 0.0,
            "rollout/logprob_gap_tokens": int(sums[1])}

"""In-engine generation with the student's own (TP/PP-sharded) megatron chunks.

Shapes: prompts [b, P] (P = longest prompt), rows B = b * n (n samples per prompt, row =
prompt * n + sample), hidden [sq, B, h], logits [B, V/tp] (vocab-parallel shard, last
pipeline stage only), output tokens [B, L] right-padded; with `keep_hidden`, the student's
final hidden states [response tokens, h] on the last stage.

    rollouts = generate(chunks, groups, arch, prompts, GenerationConfig(max_new_tokens=256,
                        temperature=1.0, n=4, stop_ids=tok.stop_ids, pad_id=tok.pad_id),
                        seed=1234, step=train_step)

Every rank of the model-parallel group (all TP and PP ranks of one DP replica) calls it
with the same prompts and gets the same `Rollouts`. The two engines live in their own
modules: `rollout/batching.py` (dynamic) and `rollout/static.py` (static); the configs and
`Rollouts` in `rollout/types.py` (re-exported here). Design, padding, the pipeline step
protocol and sampling determinism: docs/generate.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tip_megatron.runtime.device import current_device
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.state import unwrap
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.rollout import cuda_graph, decode
from tip_megatron.rollout.batching import generate_dynamic
from tip_megatron.rollout.consistency import logprob_gap
from tip_megatron.rollout.env import Episodes, Observation, Turn
from tip_megatron.rollout.static import generate_static
from tip_megatron.rollout.turns import TurnTracker
from tip_megatron.rollout.types import ENGINES, GenerationConfig, Rollouts, SamplingConfig

__all__ = ["ENGINES", "Episodes", "GenerationConfig", "Observation", "Rollouts", "SamplingConfig",
           "Turn", "generate"]


@torch.no_grad()
def generate(
    chunks: Sequence[torch.nn.Module],
    groups: ParallelGroups,
    arch: ModelArch,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    seed: int,
    step: int = 0,
    row_offset: int = 0,
    episodes: Optional[Episodes] = None,
) -> Rollouts:
    """Sample `config.n` continuations of every prompt with this rank's model chunks.

    Args:
        chunks: this rank's GPTModel chunks (DDP-wrapped or not), as built for training.
        prompts: token ids; every rank of the model-parallel group passes the same list.
        seed, step: each draw is a pure function of (seed, step, global row id, the row's
            generated-token count) and the logits: equal on every TP/PP layout, engine and
            batch composition; a new `step` (e.g. the training step) draws fresh samples.
        row_offset: global index of this call's first row (prompt-major, n samples per
            prompt). Data-parallel replicas holding consecutive slices of one global batch
            pass `dp_rank * rows_per_rank`, so DP=2 draws exactly what DP=1 draws; callers
            with unrelated batches pass offsets that do not overlap.
        episodes: with `config.env` (multi-turn): the prompts' records, the tokenizer and
            the environment (rollout/env.py); built here, one environment per row.
    """
    device = current_device()
    _check_inputs(chunks, groups, arch, prompts, config)
    for name, value in (("seed", seed), ("step", step)):
        # The sampler key packs seed and (step, position) into 64 bits.
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise ValueError(f"{name}={value!r}: must be an integer in [0, 2**32)")
    if config.cuda_graph:
        cuda_graph.check_supported(config, device, groups.pp_size,
                                   decode.resolve_layer_impl(chunks, config.layer_impl))
    tracker = _tracker(groups, prompts, config, episodes, device)
    if config.engine == "dynamic" and config.use_kv_cache:
        rollouts = generate_dynamic(chunks, groups, arch, prompts, config, seed, step, row_offset,
                                    device, tracker)
    else:
        rollouts = generate_static(chunks, groups, arch, prompts, config, seed, step, row_offset,
                                   device, tracker)
    for chunk in map(unwrap, chunks):
        chunk.set_input_tensor(None)  # drop the last received activation
    if config.check_logprobs:
        rollouts.logprob_gap = logprob_gap(chunks, groups, arch, rollouts, config)
    return rollouts


def _tracker(groups: ParallelGroups, prompts, config: GenerationConfig, episodes: Optional[Episodes],
             device) -> Optional[TurnTracker]:
    """Multi-turn: this call's environments (built now: collective) and their bookkeeping."""
    if not config.multi_turn:
        if episodes is not None:
            raise ValueError("episodes given but config.env is not set")
        return None
    if episodes is None or len(episodes.records) != len(prompts):
        raise ValueError(f"config.env={config.env!r} needs `episodes` with one record per prompt "
                         f"({len(prompts)})")
    episodes.env_path, episodes.env_args, episodes.n = config.env, dict(config.env_args), config.n
    episodes.observation_format = config.observation_format
    episodes.timeout_s, episodes.mp_group, episodes.device = config.env_timeout_s, groups.mp_group, device
    episodes.build()
    return TurnTracker(episodes, config, len(prompts) * config.n)


def _check_inputs(chunks, groups: ParallelGroups, arch: ModelArch,
                  prompts: Sequence[Sequence[int]], config: GenerationConfig) -> None:
    """Fail before any collective, with a message naming the offending value."""
    layout = groups.layout
    if len(chunks) != (layout.vpp or 1):
        raise ValueError(f"got {len(chunks)} model chunks; layout vpp={layout.vpp} needs {layout.vpp or 1}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    bad = [i for p in prompts for i in p if not 0 <= int(i) < arch.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} outside the vocabulary [0, {arch.vocab_size})")
    for name, ids in (("pad_id", (config.pad_id,)), ("stop_ids", config.stop_ids)):
        if any(not 0 <= i < arch.vocab_size for i in ids):
            raise ValueError(f"{name}={ids}: ids must lie in [0, {arch.vocab_size})")
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    if longest > arch.max_position_embeddings:
        raise ValueError(
            f"longest prompt + max_new_tokens = {longest} exceeds the model's "
            f"max_position_embeddings={arch.max_position_embeddings}; shorten the prompts "
            "(max_prompt_len) or lower max_new_tokens"
        )

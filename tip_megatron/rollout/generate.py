"""In-engine generation with the student's own (TP/PP-sharded) megatron chunks.

Shapes: prompts [b, P] left-padded (P = longest prompt), rows B = b * n (n samples per
prompt, row = prompt * n + sample), hidden [sq, B, h], logits [B, V/tp] (vocab-parallel
shard, last pipeline stage only), output tokens [B, L] right-padded.

    rollouts = generate(chunks, groups, arch, prompts, GenerationConfig(max_new_tokens=256,
                        temperature=1.0, n=4, stop_ids=tok.stop_ids, pad_id=tok.pad_id),
                        seed=1234, step=train_step)

Every rank of the model-parallel group (all TP and PP ranks of one DP replica) calls it
with the same prompts and gets the same `Rollouts`. Design, padding, the pipeline step
protocol and sampling determinism: docs/generate.md.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron import platform
from tip_megatron.models.arch import ModelArch
from tip_megatron.models.sequence_parallel import sequence_parallel_off
from tip_megatron.models.state import unwrap
from tip_megatron.ops.sampling import vocab_parallel_sample
from tip_megatron.parallel import ParallelGroups
from tip_megatron.rollout import cuda_graph, decode, kv_cache
from tip_megatron.rollout.batching import DynamicDecoder
from tip_megatron.rollout.kv_cache import KVCache, SlotCache


ENGINES = ("dynamic", "static")


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample: the run config's `rollout` section, and the options of
    `GenerationConfig` a user chooses (the rest come from the tokenizer and the engine)."""

    n: int = 1
    """Samples per prompt; rows of one prompt are consecutive (the paper: 16)."""
    max_new_tokens: int = 256
    """Tokens generated per sample at most, the stop token included (the paper: 8192)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax, lowest id on ties; log-probs are 0)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens with probability >= top_p (1 = all)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""

    def validate(self, prefix: str = "") -> None:
        """ValueError naming `<prefix><field>` and the accepted values (the run config
        passes `rollout.`)."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{prefix}n={self.n!r}: must be an integer >= 1")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise ValueError(f"{prefix}temperature={self.temperature!r}: must be a finite number "
                             ">= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{prefix}top_p={self.top_p!r}: must be in (0, 1] (1 = no top-p)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{prefix}top_k={self.top_k!r}: must be an integer >= 0 (0 = no top-k)")


@dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """How to decode (the model and the prompts are arguments of `generate`): the sampling
    options plus the tokenizer's ids and the engine's implementation choices."""

    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sample (the tokenizer's `stop_ids`); empty = max tokens only."""
    pad_id: int = 0
    """Id written after a sample ends and in the padding (the tokenizer's `pad_id`)."""
    use_kv_cache: bool = True
    """False recomputes the whole sequence every step (reference and benchmark only)."""
    layer_impl: str = "auto"
    """Transformer layers: `megatron` (megatron's TransformerBlock, any layer spec),
    `functional` (the same layer over megatron's parameters, local spec; faster per
    step), `auto` (functional when the model qualifies). See rollout/decode.py."""
    engine: str = "dynamic"
    """`dynamic` (rows leave the batch when they stop, waiting prompts join; rollout/
    batching.py) or `static` (every row decoded until the longest is done: the engine as
    it was, kept for comparison and benchmarks). Both draw the same samples."""
    max_batch_tokens: int = 0
    """KV-cache positions of the dynamic engine's batch: rows held at once = this //
    (longest prompt + max_new_tokens), at least n; 0 = every row at once."""
    check_logprobs: bool = False
    """Rerun the rollouts through the training forward and report the largest and mean gap
    of the sampled tokens' log-probs (`Rollouts.logprob_gap`; rollout/consistency.py)."""
    cuda_graph: bool = False
    """Capture the decode step's forward in a CUDA graph and replay it (CUDA only; the
    static engine with the KV cache, pipeline size 1, functional layers; not yet run on
    a GPU: rollout/cuda_graph.py)."""

    def __post_init__(self) -> None:
        self.validate()
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: accepted values are {ENGINES}")
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens!r}: must be an integer >= 0 (0 = all rows)")
        if self.layer_impl not in decode.LAYER_IMPLS:
            raise ValueError(f"layer_impl={self.layer_impl!r}: accepted values are {decode.LAYER_IMPLS}")
        if self.cuda_graph and (self.engine != "static" or not self.use_kv_cache):
            raise ValueError(f"cuda_graph=True needs engine='static' and use_kv_cache=True "
                             f"(got engine={self.engine!r}, use_kv_cache={self.use_kv_cache})")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int,
                      **engine) -> "GenerationConfig":
        """The one conversion from the run config's `rollout` section."""
        chosen = {f.name: getattr(sampling, f.name) for f in fields(SamplingConfig)}
        return cls(**chosen, stop_ids=tuple(stop_ids), pad_id=pad_id, **engine)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollouts:
    """Generated samples, identical on every rank of the model-parallel group.

    Row r holds prompt `prompt_index[r]`, sample `sample_index[r]`: its prompt tokens, then
    its response, then `pad_id` (right padding: token j sits at position j, as training
    forwards expect).
    """

    token_ids: torch.Tensor
    """[B, L] int64: prompt, response, padding."""
    response_mask: torch.Tensor
    """[B, L] bool: True on generated tokens (the stop token included), False on prompt
    and padding."""
    logprobs: torch.Tensor
    """[B, L] float32: log-prob of each generated token under the sampling distribution
    (temperature, top-k, top-p applied; 0 when greedy); 0 outside the response."""
    prompt_lengths: torch.Tensor
    """[B] int64."""
    response_lengths: torch.Tensor
    """[B] int64: generated tokens, the stop token included."""
    stopped: torch.Tensor
    """[B] bool: the sample ended with a stop id (False: it hit max_new_tokens)."""
    prompt_index: torch.Tensor
    """[B] int64: index into the `prompts` argument."""
    sample_index: torch.Tensor
    """[B] int64: 0 .. n-1."""
    stats: Optional[dict] = None
    """Timings and sizes of the call on this rank (prefill_s, decode_s, row_steps,
    kv_cache_bytes, ...: batching.EngineStats)."""
    logprob_gap: Optional[dict] = None
    """With `check_logprobs`: {"max", "mean"} |engine - training forward| log-prob of the
    sampled tokens (rollout/consistency.py)."""

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    def response(self, row: int) -> list[int]:
        """The generated ids of one row."""
        start = int(self.prompt_lengths[row])
        return self.token_ids[row, start:start + int(self.response_lengths[row])].tolist()


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
    """
    device = platform.current_device()
    _check_inputs(chunks, groups, arch, prompts, config)
    for name, value in (("seed", seed), ("step", step)):
        # The sampler key packs seed and (step, position) into 64 bits.
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise ValueError(f"{name}={value!r}: must be an integer in [0, 2**32)")
    if config.cuda_graph:
        cuda_graph.check_supported(config, device, groups.pp_size,
                                   decode.resolve_layer_impl(chunks, config.layer_impl))
    if config.engine == "dynamic" and config.use_kv_cache:
        rollouts = _generate_dynamic(chunks, groups, arch, prompts, config, seed, step, row_offset, device)
    else:
        rollouts = _generate_static(chunks, groups, arch, prompts, config, seed, step, row_offset, device)
    for chunk in map(unwrap, chunks):
        chunk.set_input_tensor(None)  # drop the last received activation
    if config.check_logprobs:
        from tip_megatron.rollout.consistency import logprob_gap

        rollouts.logprob_gap = logprob_gap(chunks, groups, arch, rollouts, config)
    return rollouts


def _generate_static(chunks, groups, arch, prompts, config, seed, step, row_offset, device) -> Rollouts:
    prompt_ids, pads = _left_pad(prompts, config.pad_id, device)
    total = prompt_ids.shape[1] + config.max_new_tokens
    # Sequence parallelism (training layout) is switched off while decoding: same weights.
    with sequence_parallel_off(chunks), _eval_mode(chunks), \
            kv_cache.install(chunks, _cache_type(config)(total, config.use_kv_cache)) as cache:
        loop = _Decoder(chunks, groups, arch, config, seed, step, row_offset)
        loop.prepare(total)
        begin = time.perf_counter()
        loop.cache = cache
        if config.cuda_graph:
            loop.graphed = cuda_graph.GraphedStep(loop.step_logits, cache, capture=device.type == "cuda")
        tokens, logprobs, lengths, stopped = loop.run(prompt_ids, pads)
        kv_bytes = cache.num_bytes
    out = _pack(tokens, logprobs, pads.repeat_interleave(config.n), prompt_ids.shape[1],
                lengths, stopped, config)
    seconds = time.perf_counter() - begin
    out.stats = dict(engine="static", seconds=seconds, prefill_s=loop.prefill_s,
                     decode_s=seconds - loop.prefill_s, kv_cache_bytes=kv_bytes,
                     row_steps=loop.row_steps, capacity_rows=out.num_rows)
    return out


def _generate_dynamic(chunks, groups, arch, prompts, config, seed, step, row_offset, device) -> Rollouts:
    max_len = max(map(len, prompts)) + config.max_new_tokens
    rows = len(prompts) * config.n
    capacity = rows if config.max_batch_tokens == 0 else min(rows, config.max_batch_tokens // max_len)
    if capacity < config.n:
        raise ValueError(f"max_batch_tokens={config.max_batch_tokens} holds {capacity} rows of "
                         f"{max_len} positions; it must hold n={config.n}: >= {config.n * max_len} (or 0)")
    units = [unwrap(c) for c in chunks]
    begin = time.perf_counter()
    # Sequence parallelism (training layout) is switched off while decoding: same weights.
    with sequence_parallel_off(chunks), _eval_mode(chunks), \
            kv_cache.install(chunks, SlotCache(capacity, max_len)) as cache:
        impl = decode.resolve_layer_impl(chunks, config.layer_impl)
        tables = [decode.rope_table(chunk, max_len) for chunk in units]
        engine = DynamicDecoder(units, groups, arch, config, seed, step, row_offset, impl, tables, cache)
        tokens, logprobs, lengths, stopped = engine.run(prompts, device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long,
                                  device=device).repeat_interleave(config.n)
    width = int((prompt_lengths + lengths).max())
    cols = torch.arange(width, device=device)[None, :]
    response = (cols >= prompt_lengths[:, None]) & (cols < (prompt_lengths + lengths)[:, None])
    index = torch.arange(rows, device=device)
    stats = dict(engine="dynamic", seconds=time.perf_counter() - begin, **vars(engine.stats))
    return Rollouts(token_ids=torch.where(cols < (prompt_lengths + lengths)[:, None], tokens[:, :width],
                                          config.pad_id),
                    response_mask=response, logprobs=torch.where(response, logprobs[:, :width], 0.0),
                    prompt_lengths=prompt_lengths, response_lengths=lengths, stopped=stopped,
                    prompt_index=index // config.n, sample_index=index % config.n, stats=stats)


class _Decoder:
    """The decoding loop of one call: pipeline forwards, sampling, stop bookkeeping."""

    def __init__(self, chunks, groups: ParallelGroups, arch: ModelArch, config: GenerationConfig,
                 seed: int, step: int, row_offset: int):
        self.chunks = [unwrap(c) for c in chunks]
        self.groups, self.arch, self.config = groups, arch, config
        self.seed, self.step, self.row_offset = seed, step, row_offset
        self.cache: Optional[KVCache] = None
        self.last = groups.is_last_stage
        self.dtype = self.chunks[0].config.params_dtype
        self.impl = decode.resolve_layer_impl(chunks, config.layer_impl)
        self.tables: list[torch.Tensor] = []
        self.row_steps = 0
        self.graphed: Optional[cuda_graph.GraphedStep] = None

    def prepare(self, max_len: int) -> None:
        """RoPE tables for every chunk (megatron caches them per length)."""
        self.tables = [decode.rope_table(chunk, max_len) for chunk in self.chunks]

    def run(self, prompt_ids: torch.Tensor, pads: torch.Tensor):
        cfg, n = self.config, self.config.n
        rows, width = prompt_ids.shape[0] * n, prompt_ids.shape[1]
        tokens = torch.full((rows, width + cfg.max_new_tokens), cfg.pad_id, dtype=torch.long,
                            device=prompt_ids.device)
        tokens[:, :width] = prompt_ids.repeat_interleave(n, dim=0)
        logprobs = torch.zeros(rows, width + cfg.max_new_tokens, device=prompt_ids.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=prompt_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
        stopped = torch.zeros_like(done)
        begin = time.perf_counter()
        if cfg.use_kv_cache:  # prefill each prompt once, then copy its cache rows n times
            logits = self.forward(prompt_ids, pads, start=0)
            self.cache.repeat_rows(n)
            logits = None if logits is None else logits.repeat_interleave(n, dim=0)
        pads = pads.repeat_interleave(n)
        if not cfg.use_kv_cache:
            logits = self.forward(tokens[:, :width], pads, start=0)
        stop_ids = torch.tensor(cfg.stop_ids, dtype=torch.long, device=tokens.device)
        self.prefill_s = time.perf_counter() - begin
        for t in range(cfg.max_new_tokens):
            col = width + t
            ids, logprob = self.sample(logits, t, rows, tokens.device)
            ids = torch.where(done, cfg.pad_id, ids)
            tokens[:, col], logprobs[:, col] = ids, torch.where(done, 0.0, logprob)
            lengths += (~done).long()
            hit = torch.isin(ids, stop_ids) & ~done
            stopped |= hit
            done |= hit
            if t + 1 == cfg.max_new_tokens or bool(done.all()):
                break
            self.row_steps += rows
            if cfg.use_kv_cache:
                logits = self.forward(tokens[:, col:col + 1], pads, start=col)
            else:
                logits = self.forward(tokens[:, :col + 1], pads, start=0)
        logprobs = self._broadcast_from_last(logprobs)
        return tokens, logprobs, lengths, stopped

    def sample(self, logits: Optional[torch.Tensor], t: int, rows: int, device) -> tuple:
        """Sampled ids [rows] on every stage; log-probs [rows] on the last stage only."""
        cfg = self.config
        if self.last:
            ids, logprob = vocab_parallel_sample(
                logits, tp_group=self.groups.tp_group, vocab_size=self.arch.vocab_size,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                seed=self.seed, step=self.step, row_offset=self.row_offset,
                counters=torch.full((rows,), t, dtype=torch.long, device=device),
            )
        else:
            ids = torch.empty(rows, dtype=torch.long, device=device)
            logprob = torch.zeros(rows, device=device)
        return self._broadcast_from_last(ids), logprob

    def _broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        # The last stage samples; every stage needs the ids (the first to embed them, all
        # to agree on when to stop). One [rows] broadcast per step, never the vocabulary.
        if self.groups.pp_size > 1:
            dist.broadcast(tensor, group=self.groups.pp_group, group_src=self.groups.pp_size - 1)
        return tensor

    def forward(self, tokens: torch.Tensor, pads: torch.Tensor, start: int) -> Optional[torch.Tensor]:
        """Run cache columns [start, start + sq) of every row through this rank's chunks;
        the last stage returns the logit shard of the last column, others None."""
        sq = tokens.shape[1]
        allowed = _attention_mask(pads, start, sq)
        positions = (torch.arange(start, start + sq, device=tokens.device)[None, :]
                     - pads[:, None]).clamp(min=0)
        if self.graphed is not None and sq == 1:  # decode steps replay the captured forward
            return self.graphed(tokens, positions, cuda_graph.full_length_mask(allowed, self.cache.max_len),
                                start)
        self.cache.set_window(start, allowed)
        return self.step_logits(tokens, positions)

    def step_logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        hidden = decode.pipeline_forward(self.chunks, self.impl, self.tables, self.groups, tokens,
                                         positions, self.arch.hidden_size)
        return decode.last_token_logits(self.chunks[-1], hidden) if self.last else None


def _cache_type(config: GenerationConfig) -> type:
    return cuda_graph.GraphKVCache if config.cuda_graph else KVCache


def _attention_mask(pads: torch.Tensor, start: int, sq: int) -> torch.Tensor:
    """[B, 1, sq, start + sq] bool, True = may attend: causal, minus the row's left
    padding. Each query also sees itself, so padding queries (whose outputs nobody reads)
    never meet an all-masked row, whose softmax would be NaN."""
    keys = torch.arange(start + sq, device=pads.device)
    queries = torch.arange(start, start + sq, device=pads.device)
    causal = keys[None, :] <= queries[:, None]  # [sq, sk]
    real = keys[None, :] >= pads[:, None]  # [B, sk]
    allowed = (causal[None] & real[:, None, :]) | (keys[None, :] == queries[:, None])[None]
    return allowed[:, None]


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    """(ids [b, P] left-padded with pad_id, pads [b] = P - length)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pads.to(device)


def _pack(tokens: torch.Tensor, logprobs: torch.Tensor, pads: torch.Tensor, width: int,
          lengths: torch.Tensor, stopped: torch.Tensor, config: GenerationConfig) -> Rollouts:
    """Left-padded decoding buffers [B, P + T] -> right-padded Rollouts [B, L]."""
    prompt_lengths = width - pads
    ends = prompt_lengths + lengths
    cols = torch.arange(int(ends.max()), device=tokens.device)[None, :]
    src = (pads[:, None] + cols).clamp(max=tokens.shape[1] - 1)
    valid = cols < ends[:, None]
    response = valid & (cols >= prompt_lengths[:, None])
    rows = tokens.shape[0]
    return Rollouts(
        token_ids=torch.where(valid, tokens.gather(1, src), config.pad_id),
        response_mask=response,
        logprobs=torch.where(response, logprobs.gather(1, src), 0.0),
        prompt_lengths=prompt_lengths,
        response_lengths=lengths,
        stopped=stopped,
        prompt_index=torch.arange(rows, device=tokens.device) // config.n,
        sample_index=torch.arange(rows, device=tokens.device) % config.n,
    )


@contextlib.contextmanager
def _eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode for the call; every module's own training flag restored afterwards."""
    modes = [(m, m.training) for c in chunks for m in c.modules()]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


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

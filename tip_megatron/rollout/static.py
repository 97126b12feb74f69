"""The static decoding engine: every row decoded until the longest is done
(`GenerationConfig.engine="static"`, and every engine call without the KV cache).

Shapes: prompts [b, P] left-padded (P = longest prompt), rows B = b * n, hidden
[sq, B, h], logits [B, V/tp] (last pipeline stage only), decoding buffers [B, P + T]
left-padded, packed into right-padded `Rollouts` [B, L] at the end.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.models.arch import ModelArch
from tip_megatron.models.sequence_parallel import sequence_parallel_off
from tip_megatron.models.state import unwrap
from tip_megatron.ops.sampling import SamplingBuffers, vocab_parallel_sample
from tip_megatron.runtime.parallel import ParallelGroups
from tip_megatron.rollout import cuda_graph, decode, kv_cache
from tip_megatron.rollout.kv_cache import KVCache
from tip_megatron.rollout.turns import TurnTracker
from tip_megatron.rollout.types import GenerationConfig, Rollouts


def generate_static(chunks, groups, arch, prompts, config, seed, step, row_offset, device,
                    tracker: Optional[TurnTracker] = None) -> Rollouts:
    prompt_ids, pads = left_pad(prompts, config.pad_id, device)
    total = prompt_ids.shape[1] + config.max_new_tokens
    # Sequence parallelism (training layout) is switched off while decoding: same weights.
    with sequence_parallel_off(chunks), decode.eval_mode(chunks), \
            kv_cache.install(chunks, _cache_type(config)(total, config.use_kv_cache)) as cache:
        loop = StaticDecoder(chunks, groups, arch, config, seed, step, row_offset)
        loop.tracker = tracker
        loop.prepare(total)
        begin = time.perf_counter()
        loop.cache = cache
        loop.recorder = decode.HiddenRecorder(config.max_new_tokens) if config.keep_hidden else None
        if config.cuda_graph:
            loop.graphed = cuda_graph.GraphedStep(loop.step_logits, cache, capture=device.type == "cuda")
        tokens, logprobs, lengths, stopped = loop.run(prompt_ids, pads)
        kv_bytes = cache.num_bytes
    out = pack(tokens, logprobs, pads.repeat_interleave(config.n), prompt_ids.shape[1],
                lengths, stopped, config, loop.generated, loop.turn_ids if tracker else None)
    if tracker is not None:
        out.num_turns = torch.tensor(tracker.num_turns(), dtype=torch.long, device=device)
    if loop.recorder is not None and loop.last:
        out.response_hidden = loop.recorder.packed(out.response_mask.sum(1))
    seconds = time.perf_counter() - begin
    out.stats = dict(engine="static", seconds=seconds, prefill_s=loop.prefill_s,
                     decode_s=seconds - loop.prefill_s, kv_cache_bytes=kv_bytes,
                     row_steps=loop.row_steps, capacity_rows=out.num_rows,
                     **(tracker.stats if tracker else {}))
    return out


class StaticDecoder:
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
        self.recorder: Optional[decode.HiddenRecorder] = None
        self.final: Optional[torch.Tensor] = None
        """[rows, h] final hidden states of the last forward's last column (when recording)."""
        self.tracker: Optional[TurnTracker] = None
        self.generated: Optional[torch.Tensor] = None
        """[B, P + T] bool: generated (not prompt, observation or padding) columns."""
        self.turn_ids: Optional[torch.Tensor] = None
        self.sample_buffers = SamplingBuffers()  # the draw's float64 buffers, reused every step

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
        gen = torch.zeros(rows, dtype=torch.long, device=prompt_ids.device)
        self.generated = torch.zeros_like(tokens, dtype=torch.bool)
        self.turn_ids = torch.full_like(tokens, -1) if self.tracker is not None else None
        # Multi-turn: observation tokens waiting to be fed, one per step (every row moves
        # one column per step here), and rows that end once theirs are fed.
        self.pending: list[list[int]] = [[] for _ in range(rows)]
        self.end_after = torch.zeros_like(done)
        begin = time.perf_counter()
        if cfg.use_kv_cache:  # prefill each prompt once, then copy its cache rows n times
            logits = self.forward(prompt_ids, pads, start=0)
            self.cache.repeat_rows(n)
            logits = None if logits is None else logits.repeat_interleave(n, dim=0)
            self._stash(repeat=n)
        pads = pads.repeat_interleave(n)
        if not cfg.use_kv_cache:
            logits = self.forward(tokens[:, :width], pads, start=0)
            self._stash()
        stop_ids = torch.tensor(cfg.stop_ids, dtype=torch.long, device=tokens.device)
        self.prefill_s = time.perf_counter() - begin
        for t in range(cfg.max_new_tokens):
            col = width + t
            ids, logprob = self.sample(logits, gen, rows, tokens.device)
            is_gen, finish = ~done, None
            if self.tracker is not None:  # a waiting observation token replaces the draw
                forced, finish = self._pop_forced()
                is_gen = is_gen & (forced < 0)
                ids = torch.where(forced < 0, ids, forced)
            ids = torch.where(done, cfg.pad_id, ids)
            tokens[:, col], logprobs[:, col] = ids, torch.where(is_gen, logprob, 0.0)
            self._keep(is_gen, gen)
            self.generated[:, col] = is_gen
            lengths += (~done).long()
            gen += is_gen.long()
            hit = torch.isin(ids, stop_ids) & is_gen
            stopped |= hit
            done |= hit
            if self.tracker is not None:
                done |= finish
                self._turns(ids, col, is_gen, done, lengths)
            if t + 1 == cfg.max_new_tokens or bool(done.all()):
                break
            self.row_steps += rows
            if cfg.use_kv_cache:
                logits = self.forward(tokens[:, col:col + 1], pads, start=col)
            else:
                logits = self.forward(tokens[:, :col + 1], pads, start=0)
            self._stash()
        logprobs = self._broadcast_from_last(logprobs)
        return tokens, logprobs, lengths, stopped

    def _pop_forced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows] the next waiting observation token of each row, -1 where none; [rows]
        rows whose rollout ends once this token is written: their last observation token)."""
        forced = torch.full_like(self.end_after, -1, dtype=torch.long)
        finish = torch.zeros_like(self.end_after)
        for row, waiting in enumerate(self.pending):
            if waiting:
                forced[row] = waiting.pop(0)
                finish[row] = not waiting and bool(self.end_after[row])
        return forced, finish

    def _turns(self, ids: torch.Tensor, col: int, is_gen: torch.Tensor, done: torch.Tensor,
               lengths: torch.Tensor) -> None:
        """Multi-turn: record turn indices; rows whose turn ended get their observation
        queued (fed one token per step: the cache continues, nothing is recomputed)."""
        rows = is_gen.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        rows_list = rows.tolist()
        self.turn_ids[rows, col] = torch.tensor([self.tracker.turn[r] for r in rows_list],
                                                dtype=torch.long, device=rows.device)
        over = done[rows] | (lengths[rows] >= self.config.max_new_tokens)
        to_env, finished = self.tracker.generated(rows_list, ids[rows].tolist(), over.tolist())
        for row in finished:
            done[row] = True
        for row, obs, ends in self.tracker.observe(to_env, lengths[to_env].tolist()):
            self.pending[row] = obs
            self.end_after[row] = ends
            if ends and not obs:
                done[row] = True

    def _stash(self, repeat: int = 1) -> None:
        """Hold the last forward's final hidden states [rows, h] (one per prompt after the
        shared prefill: repeated n times) until the step that uses them."""
        if self.recorder is not None and self.last and repeat > 1:
            self.final = self.final.repeat_interleave(repeat, dim=0)

    def _keep(self, generated: torch.Tensor, counts: torch.Tensor) -> None:
        """Record the stashed final hidden states of the rows that `generated` [rows] a
        token this step: they predicted generated token `counts[row]` (rows decoded as
        padding after their end, and observation tokens fed in place of a draw: not kept)."""
        if self.recorder is None or not self.last:
            return
        rows = generated.nonzero().squeeze(1)
        self.recorder.record(rows, counts[rows], self.final[rows])

    def sample(self, logits: Optional[torch.Tensor], counters: torch.Tensor, rows: int, device) -> tuple:
        """Sampled ids [rows] on every stage; log-probs [rows] on the last stage only.
        `counters` [rows]: each row's generated-token count (keys its draw)."""
        cfg = self.config
        if self.last:
            ids, logprob = vocab_parallel_sample(
                logits, tp_group=self.groups.tp_group, vocab_size=cfg.sample_vocab(self.arch.vocab_size),
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                seed=self.seed, step=self.step, row_offset=self.row_offset,
                counters=counters.clone(), buffers=self.sample_buffers,
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
        allowed = attention_mask(pads, start, sq)
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
        if not self.last:
            return None
        if self.recorder is not None:
            self.final = decode.last_hidden(hidden)
        return decode.last_token_logits(self.chunks[-1], hidden)


def _cache_type(config: GenerationConfig) -> type:
    return cuda_graph.GraphKVCache if config.cuda_graph else KVCache


def attention_mask(pads: torch.Tensor, start: int, sq: int) -> torch.Tensor:
    """[B, 1, sq, start + sq] bool, True = may attend: causal, minus the row's left
    padding. Each query also sees itself, so padding queries (whose outputs nobody reads)
    never meet an all-masked row, whose softmax would be NaN."""
    keys = torch.arange(start + sq, device=pads.device)
    queries = torch.arange(start, start + sq, device=pads.device)
    causal = keys[None, :] <= queries[:, None]  # [sq, sk]
    real = keys[None, :] >= pads[:, None]  # [B, sk]
    allowed = (causal[None] & real[:, None, :]) | (keys[None, :] == queries[:, None])[None]
    return allowed[:, None]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    """(ids [b, P] left-padded with pad_id, pads [b] = P - length)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pads.to(device)


def pack(tokens: torch.Tensor, logprobs: torch.Tensor, pads: torch.Tensor, width: int,
          lengths: torch.Tensor, stopped: torch.Tensor, config: GenerationConfig,
          generated: Optional[torch.Tensor] = None, turn_ids: Optional[torch.Tensor] = None) -> Rollouts:
    """Left-padded decoding buffers [B, P + T] -> right-padded Rollouts [B, L]
    (`generated`: [B, P + T] the generated columns; None = every column after the prompt)."""
    prompt_lengths = width - pads
    ends = prompt_lengths + lengths
    cols = torch.arange(int(ends.max()), device=tokens.device)[None, :]
    src = (pads[:, None] + cols).clamp(max=tokens.shape[1] - 1)
    valid = cols < ends[:, None]
    response = valid & (cols >= prompt_lengths[:, None])
    if generated is not None:
        response &= generated.gather(1, src)
    rows = tokens.shape[0]
    turns = None if turn_ids is None else torch.where(response, turn_ids.gather(1, src), -1)
    return Rollouts(
        token_ids=torch.where(valid, tokens.gather(1, src), config.pad_id),
        response_mask=response,
        logprobs=torch.where(response, logprobs.gather(1, src), 0.0),
        prompt_lengths=prompt_lengths,
        response_lengths=lengths,
        stopped=stopped,
        prompt_index=torch.arange(rows, device=tokens.device) // config.n,
        sample_index=torch.arange(rows, device=tokens.device) % config.n,
        turn_ids=turns,
    )


"""The dynamic decoding engine: one prefill per prompt, finished rows leave, new prompts join.

Shapes: `cap` row slots of a `SlotCache` ([cap, ng/tp, max_len, hn] per layer), the live
batch = slots [0, live); per-slot state [cap] int64; a prefill of m prompts [m, sq]
right-padded; output buffers [R, max_len] (R = prompts * n, row = prompt * n + sample),
right-padded: token j of a row at column j, as training forwards expect.

    tokens, logprobs, lengths, stopped = DynamicDecoder(...).run(prompts)

Each loop iteration: drop the rows that stopped (live rows from the tail move into the
holes: a copy of the moved rows only, so the batch stays a contiguous prefix), admit
waiting prompts while `n` free slots per prompt remain (each prompt prefilled ONCE, its KV
rows copied to its n slots, its n first tokens drawn from the one logit row), then one
decode step of every live row, each at its own cache column and RoPE position.

A row's draw is keyed by (seed, step, row_offset + row, new-token count), never by its
slot, so its tokens do not depend on the batch it shares, the capacity or the admission
order (up to float rounding of the logits themselves, which may depend on batch shape).
Every pipeline stage takes the same decisions: they depend only on the sampled ids, which
the last stage broadcasts each step (docs/generate.md).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tip_megatron.models.sequence_parallel import sequence_parallel_off
from tip_megatron.models.state import unwrap
from tip_megatron.ops.sampling import SamplingBuffers, vocab_parallel_sample
from tip_megatron.rollout import decode, kv_cache
from tip_megatron.rollout.kv_cache import SlotCache, key_segments, segment_call_cost
from tip_megatron.rollout.turns import TurnTracker
from tip_megatron.rollout.types import Rollouts


@dataclass
class EngineStats:
    """Where the time of one `generate` call went (this rank's clock)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prefills: int = 0
    num_decode_steps: int = 0
    row_steps: int = 0
    """Rows computed, summed over decode steps (live-row utilisation = tokens / this)."""
    kv_cache_bytes: int = 0
    capacity_rows: int = 0
    num_extensions: int = 0
    """Multi-turn: forwards that appended observations to cached rows."""
    key_columns: int = 0
    """Key columns attended by decode steps' rows (one layer), summed over steps."""
    key_columns_longest: int = 0
    """The same, had every row attended over the longest live row's keys."""
    attention_segments: int = 0
    """Runs of rows attended on their own (`kv_cache.key_segments`), summed over steps."""


class DynamicDecoder:
    """Continuous batching over a `SlotCache` of `capacity` rows."""

    def __init__(self, chunks, groups, arch, config, seed: int, step: int, row_offset: int,
                 impl: str, tables: Sequence[torch.Tensor], cache: SlotCache,
                 tracker: Optional[TurnTracker] = None):
        self.chunks, self.groups, self.arch, self.config = chunks, groups, arch, config
        self.seed, self.step, self.row_offset = seed, step, row_offset
        self.impl, self.tables, self.cache = impl, tables, cache
        self.last = groups.is_last_stage
        self.stats = EngineStats(capacity_rows=cache.capacity)
        self.stop_ids: Optional[torch.Tensor] = None
        self.recorder = decode.HiddenRecorder(config.max_new_tokens) if config.keep_hidden else None
        self.tracker = tracker
        self.sample_buffers = SamplingBuffers()  # the draw's float64 buffers, reused every step

    def run(self, prompts: Sequence[Sequence[int]], device) -> tuple:
        cfg, n, cap = self.config, self.config.n, self.cache.capacity
        rows = len(prompts) * n
        self.out_tokens = torch.full((rows, self.cache.max_len), cfg.pad_id, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(rows, self.cache.max_len, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.generated = torch.zeros(rows, self.cache.max_len, dtype=torch.bool, device=device)
        self.turn_ids = (torch.full((rows, self.cache.max_len), -1, dtype=torch.long, device=device)
                         if self.tracker is not None else None)
        self.stop_ids = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)
        # Per-slot state: row index, prompt length, generated count (the sampler's
        # counter), tokens after the prompt (generated + observations), last token.
        self.slot = {k: torch.zeros(cap, dtype=torch.long, device=device)
                     for k in ("row", "prompt_len", "new", "span", "next")}
        self.done = torch.zeros(cap, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.out_tokens[i * n:(i + 1) * n, :len(p)] = torch.as_tensor(list(p), device=device)
        queue, live = collections.deque(range(len(prompts))), 0
        while True:
            live = self._compact(live)  # first: the slots of rows that just stopped are free
            take = []
            while queue and live + n * (len(take) + 1) <= cap:
                take.append(queue.popleft())
            if take:
                # Longest first: rows then lie in runs of falling length, so each run attends
                # over its own keys (`key_segments`), and the rows that move into the holes
                # finished rows leave (from the tail: the shortest) do not lengthen a run.
                take.sort(key=lambda i: -len(prompts[i]))
                self._admit(take, [prompts[i] for i in take], live)
                live = self._compact(live + len(take) * n)  # a first token may stop a row
            if live == 0:
                if not queue:
                    break
                continue
            self._decode_step(live)
        self.stats.kv_cache_bytes = self.cache.num_bytes
        if self.groups.pp_size > 1:  # the last stage drew them; every stage returns them
            dist.broadcast(self.out_logprobs, group=self.groups.pp_group,
                           group_src=self.groups.pp_size - 1)
        return self.out_tokens, self.out_logprobs, self.lengths, self.stopped

    def _admit(self, indices: list[int], prompts: list, start: int) -> None:
        """Prefill `prompts` once into slots [start, start + m), copy each row to its n
        slots, draw every row's first token."""
        begin = time.perf_counter()
        n, m, device = self.config.n, len(prompts), self.out_tokens.device
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        sq = int(lens.max())
        ids = torch.full((m, sq), self.config.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(list(p), device=device)
        # Right padding: plain causal attention; a padding query only sees real keys and
        # earlier padding, and nobody reads its output.
        causal = torch.ones(sq, sq, dtype=torch.bool, device=device).tril()[None, None]
        self.cache.set_window(start, None, sq, causal)
        positions = torch.arange(sq, device=device)[None, :].expand(m, sq)
        hidden = decode.pipeline_forward(self.chunks, self.impl, self.tables, self.groups, ids,
                                         positions, self.arch.hidden_size)
        logits = decode.last_token_logits(self.chunks[-1], hidden, lens - 1) if self.last else None
        first_hidden = self._final(hidden, lens - 1)
        if n > 1:  # the shared prefill: copy each prompt's KV rows to its n slots
            src = start + torch.arange(m, device=device).repeat_interleave(n)
            self.cache.move_rows(src, start + torch.arange(m * n, device=device), sq)
            logits = None if logits is None else logits.repeat_interleave(n, dim=0)
        slots = torch.arange(start, start + m * n, device=device)
        prompt_index = torch.tensor(indices, dtype=torch.long, device=device)
        self.slot["row"][slots] = (prompt_index[:, None] * n + torch.arange(n, device=device)).flatten()
        self.slot["prompt_len"][slots] = lens.repeat_interleave(n)
        self.slot["new"][slots] = 0
        self.slot["span"][slots] = 0
        if first_hidden is not None:  # the last prompt position predicts every sample's token 0
            self._keep(slots, first_hidden.repeat_interleave(n, dim=0))
        self._sample_and_record(logits, slots)
        self.stats.prefill_s += time.perf_counter() - begin
        self.stats.num_prefills += 1

    def _decode_step(self, live: int) -> None:
        begin = time.perf_counter()
        slots = torch.arange(live, device=self.lengths.device)
        columns = self.slot["prompt_len"][:live] + self.slot["span"][:live] - 1  # the fed token's
        # Each run of rows attends over its own longest row's keys, not the batch's longest.
        call_cost = segment_call_cost(columns.device, self.cache.column_bytes())
        segments = key_segments(columns.tolist(), call_cost)
        num_keys = max(s.num_keys for s in segments)
        self.stats.key_columns += sum((s.hi - s.lo) * s.num_keys for s in segments)
        self.stats.key_columns_longest += live * num_keys
        self.stats.attention_segments += len(segments)
        keys = torch.arange(num_keys, device=columns.device)
        self.cache.set_window(0, columns, num_keys, (keys[None, :] <= columns[:, None])[:, None, None],
                              segments=segments)
        hidden = decode.pipeline_forward(self.chunks, self.impl, self.tables, self.groups,
                                         self.slot["next"][:live, None], columns[:, None],
                                         self.arch.hidden_size)
        logits = decode.last_token_logits(self.chunks[-1], hidden) if self.last else None
        final = self._final(hidden, None)
        if final is not None:
            self._keep(slots, final)
        self._sample_and_record(logits, slots)
        self.stats.decode_s += time.perf_counter() - begin
        self.stats.num_decode_steps += 1
        self.stats.row_steps += live

    def _final(self, hidden, index) -> Optional[torch.Tensor]:
        """[rows, h] the output layer's input of this forward, when hidden states are kept."""
        if self.recorder is None or not self.last:
            return None
        return decode.last_hidden(hidden, index)

    def _extend(self, slots: torch.Tensor, observations: list[list[int]]) -> None:
        """Continue the KV cache of `slots` by their last sampled token and their
        observation tokens (only those: the history stays cached), then draw each row's
        next token from its last observation position. Rows that wait on an environment
        are out of the decode batch for exactly this forward."""
        begin = time.perf_counter()
        device, cfg = slots.device, self.config
        feed = [[int(t)] + obs for t, obs in zip(self.slot["next"][slots].tolist(), observations)]
        lens = torch.tensor([len(f) for f in feed], dtype=torch.long, device=device)
        sq = int(lens.max())
        ids = torch.full((len(feed), sq), cfg.pad_id, dtype=torch.long, device=device)
        for i, f in enumerate(feed):
            ids[i, :len(f)] = torch.as_tensor(f, device=device)
        start = self.slot["prompt_len"][slots] + self.slot["span"][slots] - 1  # the last sampled token's
        cols = start[:, None] + torch.arange(sq, device=device)[None, :]
        valid = torch.arange(sq, device=device)[None, :] < lens[:, None]
        num_keys = int((start + lens).max())
        keys = torch.arange(num_keys, device=device)
        allowed = (keys[None, None, :] <= cols[:, :, None])[:, None]  # causal per row; padding sees all
        self.cache.set_window(0, start, num_keys, allowed, rows=slots, valid=valid)
        hidden = decode.pipeline_forward(self.chunks, self.impl, self.tables, self.groups, ids,
                                         cols.clamp(max=self.cache.max_len - 1), self.arch.hidden_size)
        logits = decode.last_token_logits(self.chunks[-1], hidden, lens - 1) if self.last else None
        final = self._final(hidden, lens - 1)
        if final is not None:  # the last observation position predicts the next turn's first token
            self._keep(slots, final)
        rows = self.slot["row"][slots]
        for row, column, obs in zip(rows.tolist(), (start + 1).tolist(), observations):
            self.out_tokens[row, column:column + len(obs)] = torch.as_tensor(obs, dtype=torch.long, device=device)
        self.slot["span"][slots] += lens - 1
        self.lengths[rows] = self.slot["span"][slots]
        self.stats.prefill_s += time.perf_counter() - begin
        self.stats.num_extensions += 1
        self._sample_and_record(logits, slots)

    def _turns(self, slots: torch.Tensor, ids: torch.Tensor, done: torch.Tensor) -> None:
        """Multi-turn: rows whose turn just ended get their environment's observation."""
        rows = self.slot["row"][slots].tolist()
        to_env, finished = self.tracker.generated(rows, ids.tolist(), done.tolist())
        if not to_env and not finished:
            return
        where = {row: k for k, row in enumerate(rows)}
        for row in finished:
            self.done[slots[where[row]]] = True
        spans = self.slot["span"][slots].tolist()
        go, go_obs, device = [], [], slots.device
        for row, obs, ends in self.tracker.observe(to_env, [spans[where[r]] for r in to_env]):
            slot = slots[where[row]]
            if not ends:
                go.append(int(slot))
                go_obs.append(obs)
                continue
            self.done[slot] = True  # appended as context only: nothing follows it
            column = int(self.slot["prompt_len"][slot] + self.slot["span"][slot])
            self.out_tokens[row, column:column + len(obs)] = torch.as_tensor(obs, dtype=torch.long, device=device)
            self.slot["span"][slot] += len(obs)
            self.lengths[row] = self.slot["span"][slot]
        if go:
            self._extend(torch.tensor(go, dtype=torch.long, device=device), go_obs)

    def _keep(self, slots: slice, final: torch.Tensor) -> None:
        """`final` [rows, h] predicted the next token of the rows in `slots`: token `new`."""
        self.recorder.record(self.slot["row"][slots], self.slot["new"][slots], final)

    def _sample_and_record(self, logits: Optional[torch.Tensor], slots: torch.Tensor) -> None:
        """Draw the next token of every row in `slots` [k] (keyed by row identity and
        generated count), write it to the outputs, mark finished rows."""
        cfg = self.config
        rows, new = self.slot["row"][slots], self.slot["new"][slots]
        span = self.slot["span"][slots]
        if self.last:
            ids, logprob = vocab_parallel_sample(
                logits, tp_group=self.groups.tp_group, vocab_size=cfg.sample_vocab(self.arch.vocab_size),
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=self.seed,
                step=self.step, row_ids=self.row_offset + rows, counters=new, buffers=self.sample_buffers)
        else:
            ids = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        if self.groups.pp_size > 1:  # every stage needs the ids: to embed them, to agree on stops
            dist.broadcast(ids, group=self.groups.pp_group, group_src=self.groups.pp_size - 1)
        columns = self.slot["prompt_len"][slots] + span
        self.out_tokens[rows, columns] = ids
        self.generated[rows, columns] = True
        if self.last:
            self.out_logprobs[rows, columns] = logprob
        hit = torch.isin(ids, self.stop_ids)
        self.slot["new"][slots] = new + 1
        self.slot["span"][slots] = span + 1
        self.slot["next"][slots] = ids
        self.lengths[rows] = span + 1
        self.stopped[rows] = hit
        done = hit | (span + 1 >= cfg.max_new_tokens)
        self.done[slots] = done
        if self.tracker is not None:
            self.turn_ids[rows, columns] = torch.tensor([self.tracker.turn[r] for r in rows.tolist()],
                                                        dtype=torch.long, device=rows.device)
            self._turns(slots, ids, done)

    def _compact(self, live: int) -> int:
        """Drop finished rows: live rows past the new end move into the holes before it."""
        done = self.done[:live]
        keep = int((~done).sum())
        if keep == live:
            return live
        index = torch.arange(live, device=done.device)
        holes = index[:keep][done[:keep]]
        movers = index[keep:][~done[keep:]]
        if movers.numel():
            used = self.slot["prompt_len"][movers] + self.slot["span"][movers]
            self.cache.move_rows(movers, holes, int(used.max()))
            for state in self.slot.values():
                state[holes] = state[movers]
            self.done[holes] = False
        return keep


def generate_dynamic(chunks, groups, arch, prompts, config, seed, step, row_offset, device,
                     tracker: Optional[TurnTracker] = None) -> Rollouts:
    """The dynamic engine's `generate` (rollout/generate.py checks the inputs)."""
    max_len = max(map(len, prompts)) + config.max_new_tokens
    rows = len(prompts) * config.n
    capacity = rows if config.max_batch_tokens == 0 else min(rows, config.max_batch_tokens // max_len)
    if capacity < config.n:
        raise ValueError(f"max_batch_tokens={config.max_batch_tokens} holds {capacity} rows of "
                         f"{max_len} positions; it must hold n={config.n}: >= {config.n * max_len} (or 0)")
    units = [unwrap(c) for c in chunks]
    begin = time.perf_counter()
    # Sequence parallelism (training layout) is switched off while decoding: same weights.
    with sequence_parallel_off(chunks), decode.eval_mode(chunks), \
            kv_cache.install(chunks, SlotCache(capacity, max_len)) as cache:
        impl = decode.resolve_layer_impl(chunks, config.layer_impl)
        tables = [decode.rope_table(chunk, max_len) for chunk in units]
        engine = DynamicDecoder(units, groups, arch, config, seed, step, row_offset, impl, tables,
                                cache, tracker)
        tokens, logprobs, lengths, stopped = engine.run(prompts, device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long,
                                  device=device).repeat_interleave(config.n)
    width = int((prompt_lengths + lengths).max())
    cols = torch.arange(width, device=device)[None, :]
    response = engine.generated[:, :width]
    index = torch.arange(rows, device=device)
    stats = dict(engine="dynamic", seconds=time.perf_counter() - begin, **vars(engine.stats))
    hidden = (engine.recorder.packed(engine.generated.sum(1))
              if engine.recorder is not None and engine.last else None)
    out = Rollouts(token_ids=torch.where(cols < (prompt_lengths + lengths)[:, None], tokens[:, :width],
                                         config.pad_id),
                   response_mask=response, logprobs=torch.where(response, logprobs[:, :width], 0.0),
                   prompt_lengths=prompt_lengths, response_lengths=lengths, stopped=stopped,
                   prompt_index=index // config.n, sample_index=index % config.n, stats=stats,
                   response_hidden=hidden)
    if tracker is not None:
        out.turn_ids = engine.turn_ids[:, :width].clone()
        out.num_turns = torch.tensor(tracker.num_turns(), dtype=torch.long, device=device)
        out.stats.update(tracker.stats)
    return out

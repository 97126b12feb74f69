"""Multi-turn generation: the KV cache continued across turns against re-prefilling the
whole history every turn (what an agent loop over a one-turn engine does).

    python tools/bench_multiturn.py --quick --json runs/bench_multiturn.json

One process, TP=1, a random tiny Llama (fp32), greedy decoding, `--prompts` prompts of
32-96 tokens, a token budget of `--budget` after the prompt, up to 4 turns; a turn ends at
one of 1/32 of the ids; the environment answers each turn with 16-48 observation ids.
Systems (all produce the same tokens: checked, greedy):
  dynamic    rollout.env with the dynamic engine: each row's cache continues, only the
             observation tokens are prefilled (one forward over the rows that waited)
  static     rollout.env with the static engine: observations fed one per step
  reprefill  one-turn dynamic engine calls, one per turn, each prefilling the whole
             history so far (prompt, earlier turns, observations), turn-stop ids as stops
Columns: seconds, generated tokens/s (observations excluded), prefill seconds, number of
prefill/extension forwards. Load average is recorded: on a shared machine the numbers are
noise; rerun on a quiet one for final tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, EOS = 512, 1
STOP_IDS = tuple(range(5, VOCAB, 32))  # 1/32 of the ids end a turn
MAX_TURNS = 4


class LongObservationEnv:
    """Deterministic: 16-48 ids that depend on the prompt index and the turn's tokens."""

    def __init__(self, record):
        self.key = int(record.prompt_id)

    def step(self, turn):
        h = (sum(turn.token_ids) * 31 + self.key * 7 + turn.index * 13) % 9973
        return "".join(f"<{20 + (h * (k + 3)) % 400}>" for k in range(16 + h % 33))


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 prompts, budget 96")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _setup():
    from tip_megatron.models import build_model
    from tip_megatron.runtime import parallel
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch(vocab_size=VOCAB, hidden_size=256, num_layers=4, ffn_hidden_size=704,
                     max_position_embeddings=1024)
    g = parallel.initialize(parallel.ParallelLayout(), seed=5)
    return g, arch, build_model(arch, g)


def _env_run(g, arch, chunks, prompts, records, budget, engine):
    from tip_megatron.rollout.generate import Episodes, GenerationConfig, generate
    from tip_megatron.testing.envs import IdTokenizer

    config = GenerationConfig(max_new_tokens=budget, temperature=0.0, stop_ids=(EOS,), engine=engine,
                              env="__main__:LongObservationEnv", max_turns=MAX_TURNS,
                              turn_stop=tuple(f"<{i}>" for i in STOP_IDS))
    out = generate(chunks, g, arch, prompts, config, seed=1, episodes=Episodes(records, IdTokenizer(VOCAB)))
    rows = [out.token_ids[r, :int(out.prompt_lengths[r] + out.response_lengths[r])].tolist()
            for r in range(out.num_rows)]
    return rows, int(out.response_mask.sum()), out.stats.get("prefill_s", 0.0), \
        out.stats.get("num_prefills", 1) + out.stats.get("num_extensions", 0)


def _reprefill_run(g, arch, chunks, prompts, records, budget):
    """One-turn calls: each turn re-prefills every row's whole history."""
    from tip_megatron.rollout.env import Turn
    from tip_megatron.rollout.generate import GenerationConfig, generate
    from tip_megatron.testing.envs import IdTokenizer

    tok = IdTokenizer(VOCAB)
    envs = [LongObservationEnv(r) for r in records]
    history = [list(p) for p in prompts]
    live, generated, prefill_s, forwards = list(range(len(prompts))), 0, 0.0, 0
    for turn in range(MAX_TURNS):
        rooms = [budget - (len(history[i]) - len(prompts[i])) for i in live]
        if not live:
            break
        # rows with the same room share a call (the engine takes one max_new_tokens)
        by_room = {}
        for i, room in zip(live, rooms):
            by_room.setdefault(room, []).append(i)
        next_live = []
        for room, rows in by_room.items():
            config = GenerationConfig(max_new_tokens=room, temperature=0.0, stop_ids=(EOS, *STOP_IDS))
            out = generate(chunks, g, arch, [history[i] for i in rows], config, seed=1)
            prefill_s += out.stats["prefill_s"]
            forwards += out.stats["num_prefills"]
            for k, i in enumerate(rows):
                ids = out.response(k)
                history[i] += ids
                generated += len(ids)
                room_left = room - len(ids)
                if not ids or ids[-1] not in STOP_IDS or room_left <= 0 or turn + 1 >= MAX_TURNS:
                    continue
                obs = tok.encode(envs[i].step(Turn(turn, tuple(ids), tok.decode(ids))))[:room_left]
                history[i] += obs
                if len(obs) < room_left:
                    next_live.append(i)
        live = sorted(next_live)
    return history, generated, prefill_s, forwards


def main(argv=None) -> int:
    args = _parse(argv)
    if args.quick:
        args.prompts, args.budget = 4, 96
    from tip_megatron.data.sources import PromptRecord

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g, arch, chunks = _setup()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(20, VOCAB, (int(torch.randint(32, 97, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(args.prompts)]
    records = [PromptRecord(str(i), p, None, "") for i, p in enumerate(prompts)]
    rows, systems = None, []
    _env_run(g, arch, chunks, prompts[:1], records[:1], 16, "dynamic")  # warm-up: first-call costs
    for name in ("dynamic", "static", "reprefill"):
        begin = time.perf_counter()
        if name == "reprefill":
            out = _reprefill_run(g, arch, chunks, prompts, records, args.budget)
        else:
            out = _env_run(g, arch, chunks, prompts, records, args.budget, name)
        seconds = time.perf_counter() - begin
        if rows is None:
            rows = out[0]
        match = out[0] == rows
        systems.append(dict(system=name, seconds=round(seconds, 3), tokens=out[1],
                            tokens_per_s=round(out[1] / seconds, 1), prefill_s=round(out[2], 3),
                            prefill_forwards=out[3], same_tokens=match))
    load = os.getloadavg()
    print(f"{'system':<10} {'seconds':>8} {'tokens':>7} {'tok/s':>8} {'prefill_s':>10} {'prefills':>9} same")
    for s in systems:
        print(f"{s['system']:<10} {s['seconds']:>8.2f} {s['tokens']:>7} {s['tokens_per_s']:>8.1f} "
              f"{s['prefill_s']:>10.2f} {s['prefill_forwards']:>9} {s['same_tokens']}")
    print(f"load average {load[0]:.1f} (1 min); prompts {args.prompts}, budget {args.budget}, "
          f"torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(systems=systems, load_average=load, prompts=args.prompts,
                                                   budget=args.budget), indent=2))
    return 0 if all(s["same_tokens"] for s in systems) else 1


if __name__ == "__main__":
    sys.exit(main())

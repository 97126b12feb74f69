"""Generation throughput: HF `generate`, the static engine (as it was), the dynamic engine.

Shapes: prompts [b] of lengths drawn in a range, n samples each -> b * n rows.

    python tools/bench_generate.py --quick                          # ~1 min on 2 cores
    python tools/bench_generate.py --json runs/bench_generate.json --legacy-src /tmp/old
    python tools/bench_generate.py --workloads spread --new-tokens 128 --vocab 32000  # issue 28
    python tools/bench_generate.py --vocab 32000 --new-tokens 128 --no-tp2 --rounds 3  # medians
    (--legacy-src: a checkout of the commit before the dynamic engine; its static engine
     and Gumbel-hash sampler run in a subprocess on the same model and prompts)

Workloads (one random fp32 HF model, weights loaded into our model through the
converter's name tables; the same prompts, dtype and torch threads for every system):
  spread   8 prompts of 20-200 tokens, n = 16, temperature 1.0, no top-k/top-p, up to 512
           new tokens, `--num-stops` stop ids spread over the vocabulary. The random
           model's next-token distribution is nearly flat, so each token stops a row with
           probability ~ num_stops / vocab (1/128 by default): response lengths are ~
           geometric, from a few tokens to the 512 cap. That is how lengths spread here.
  greedy   8 prompts of 16-48 tokens, n = 1, greedy, no stop id, 256 new tokens: every
           row runs to the end (the workload where static batching costs nothing);
           `match` = rows equal to HF's greedy tokens.
Systems: hf (transformers' generate: DynamicCache, sdpa; prefill time measured by a
max_new_tokens=1 call), legacy (static engine before this change, optional), static
(engine='static' today: static batching, the new sampler), dynamic (engine='dynamic'),
dynamic_budget (max_batch_tokens = a quarter of the rows: continuous admission), each at
TP=1 in this process, and static/dynamic at TP=2 in 2 gloo processes.
Columns: generated tokens/s (stop token included), prefill and decode seconds, live-row
utilisation = decode row-steps that produced a token / decode row-steps computed,
KV-cache MiB (allocated by our engines; HF and legacy: the [rows, prompt + generated]
cache they hold, computed). Load average is recorded: on a shared machine the numbers
are noisy; rerun on a quiet one for final tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if "--worker" not in sys.argv:  # the legacy worker imports the old tree from PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: ~7.1 M parameters: vocab 8192, hidden 256, 4 layers, GQA 8/4 heads, SwiGLU 704.
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
             rms_norm_eps=1e-6, initializer_range=0.05, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=0)
QUICK_MODEL = dict(MODEL, vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2)
WORKLOADS = {
    "spread": dict(prompts=8, prompt_len=(20, 200), n=16, new_tokens=512, temperature=1.0, stops=True),
    "greedy": dict(prompts=8, prompt_len=(16, 48), n=1, new_tokens=256, temperature=0.0, stops=False),
}
QUICK = {"spread": dict(prompts=4, n=8, new_tokens=128), "greedy": dict(new_tokens=64)}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and workloads")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--family", default="llama", choices=("llama", "qwen2", "qwen3"))
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--num-stops", type=int, default=64, help="stop ids of the spread workload")
    p.add_argument("--new-tokens", type=int, default=0,
                   help="cap of new tokens of every workload (default: spread 512, greedy 256)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size of the model (default 8192)")
    p.add_argument("--legacy-src", help="source tree of the engine as it was (adds the legacy row)")
    p.add_argument("--no-tp2", action="store_true", help="skip the TP=2 rows")
    p.add_argument("--no-hf", action="store_true", help="skip the HF rows")
    # One thread by default: on a shared 2-core machine, multi-threaded ops of a small model
    # spend more time waiting for a descheduled OpenMP worker than computing.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed calls per TP=1 system, in an order rotating every round; the table "
                        "shows medians, and each round's dynamic and static over HF's is printed")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # legacy subprocess: write results here
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: at least 1")
    return args


def _setup(args) -> tuple[dict, dict]:
    cfg = dict(QUICK_MODEL if args.quick else MODEL)
    if args.vocab:
        cfg["vocab_size"] = args.vocab
    if args.family == "qwen3":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    loads = {}
    for name in args.workloads:
        w = dict(WORKLOADS[name], **(QUICK.get(name, {}) if args.quick else {}))
        if args.new_tokens:
            w["new_tokens"] = args.new_tokens
        gen = torch.Generator().manual_seed(1)
        sizes = torch.randint(w["prompt_len"][0], w["prompt_len"][1] + 1, (w["prompts"],), generator=gen)
        w["prompt_ids"] = [torch.randint(1, cfg["vocab_size"], (int(k),), generator=gen).tolist() for k in sizes]
        step = cfg["vocab_size"] // max(args.num_stops, 1)
        w["stop_ids"] = list(range(step - 1, cfg["vocab_size"], step))[:args.num_stops] if w["stops"] else []
        loads[name] = w
    return cfg, loads


def _hf_model(family: str, cfg: dict):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**cfg)).eval()


def _engine(hf, tp: int = 1):
    from tip_megatron.runtime import parallel
    from tip_megatron.checkpoint.hf.mapping import all_rules
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.arch import ModelArch
    from tip_megatron.models.state import load_full_state_dict

    groups = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=1))
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    full = {r.mcore: r.to_full(arch, [sd[n] for n in r.hf]) for r in all_rules(arch)}
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    load_full_state_dict(chunks, full, groups, arch)
    return chunks, groups, arch


def _kv_mib(cfg: dict, rows: int, columns: int) -> float:
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * rows * cfg["num_key_value_heads"] * head * columns * 4 / 2**20


def _ours(engine, w: dict, system: str, cfg: dict) -> dict:
    """One timed generate call of our engine ('legacy' = whatever engine this tree has)."""
    from tip_megatron.rollout.generate import GenerationConfig, generate

    chunks, groups, arch = engine
    kw = dict(max_new_tokens=w["new_tokens"], temperature=w["temperature"], n=w["n"],
              stop_ids=tuple(w["stop_ids"]), pad_id=0)
    if system == "dynamic_budget":  # a quarter of the rows at once: prompts join as rows leave
        width = max(map(len, w["prompt_ids"])) + w["new_tokens"]
        kw.update(engine="dynamic", max_batch_tokens=max(w["n"], len(w["prompt_ids"]) * w["n"] // 4) * width)
    elif system != "legacy":
        kw["engine"] = system
    warm = dict(kw, max_new_tokens=4)
    generate(chunks, groups, arch, w["prompt_ids"][:2], GenerationConfig(**warm), seed=1)
    start = time.perf_counter()
    r = generate(chunks, groups, arch, w["prompt_ids"], GenerationConfig(**kw), seed=1)
    seconds = time.perf_counter() - start
    lengths = r.response_lengths
    stats = getattr(r, "stats", None) or {}
    decode_rows = int(lengths.sum()) - r.num_rows
    row_steps = stats.get("row_steps", r.num_rows * (int(lengths.max()) - 1))
    kv = stats.get("kv_cache_bytes")
    width = max(map(len, w["prompt_ids"])) + w["new_tokens"]
    return dict(seconds=seconds, tokens=int(lengths.sum()), prefill_s=stats.get("prefill_s"),
                decode_s=stats.get("decode_s"), utilisation=decode_rows / max(row_steps, 1),
                kv_mib=kv / 2**20 if kv is not None else _kv_mib(cfg, r.num_rows, width),
                lengths=_length_summary(lengths), responses=[r.response(i) for i in range(r.num_rows)])


def _length_summary(lengths: torch.Tensor) -> dict:
    q = lengths.double().quantile(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
    return dict(min=q[0], median=q[1], max=q[2], mean=float(lengths.double().mean()))


@torch.no_grad()
def _hf(hf, w: dict, cfg: dict) -> dict:
    width = max(map(len, w["prompt_ids"]))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in w["prompt_ids"]])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in w["prompt_ids"]])
    sample = w["temperature"] > 0
    kw = dict(attention_mask=mask, do_sample=sample, num_return_sequences=w["n"], pad_token_id=0,
              eos_token_id=list(w["stop_ids"]) or None)
    if sample:
        kw.update(temperature=w["temperature"], top_k=0, top_p=1.0)
    else:
        kw.update(min_new_tokens=w["new_tokens"])
    hf.generate(ids[:2], max_new_tokens=4, **dict(kw, attention_mask=mask[:2]))  # warm-up
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, **kw)
    prefill = time.perf_counter() - start
    torch.manual_seed(1)
    start = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=w["new_tokens"], **kw)
    seconds = time.perf_counter() - start
    gen = out[:, width:]
    stops = torch.isin(gen, torch.tensor(w["stop_ids"] or [-1]))
    first = torch.where(stops.any(1), stops.int().argmax(1) + 1, gen.shape[1])
    return dict(seconds=seconds, tokens=int(first.sum()), prefill_s=prefill, decode_s=seconds - prefill,
                utilisation=float((first - 1).sum()) / max(1, gen.shape[0] * (gen.shape[1] - 1)),
                kv_mib=_kv_mib(cfg, gen.shape[0], out.shape[1]), lengths=_length_summary(first),
                responses=[gen[i, :int(first[i])].tolist() for i in range(gen.shape[0])])


def _tp2_rank(family: str, cfg: dict, loads: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    engine = _engine(_hf_model(family, cfg), tp=2)
    return {(name, system): _ours(engine, w, system, cfg) for name, w in loads.items()
            for system in ("static", "dynamic")}


def _legacy(args, loads) -> dict:
    """The old tree's engine in a subprocess (same model seed and prompts)."""
    out = Path(args.json or "bench_generate.json").with_suffix(".legacy.json")
    cmd = [sys.executable, __file__, "--worker", str(out), "--family", args.family,
           "--threads", str(args.threads), "--num-stops", str(args.num_stops), "--workloads", *loads]
    # Only when set: an older tree's worker may not know these flags.
    cmd += ["--new-tokens", str(args.new_tokens)] if args.new_tokens else []
    cmd += ["--vocab", str(args.vocab)] if args.vocab else []
    if args.quick:
        cmd.append("--quick")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                                              "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(args.legacy_src).resolve())
    subprocess.run(cmd, check=True, env=env)
    return {tuple(k.split("|")): v for k, v in json.loads(out.read_text()).items()}


def _worker(args) -> int:
    torch.set_num_threads(args.threads)
    cfg, loads = _setup(args)
    engine = _engine(_hf_model(args.family, cfg))
    result = {f"{name}|legacy": _ours(engine, w, "legacy", cfg) for name, w in loads.items()}
    Path(args.worker).write_text(json.dumps(result))
    return 0


def _machine(threads: int) -> dict:
    cpu = py_platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import transformers

    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
                transformers=transformers.__version__, python=py_platform.python_version(),
                uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def _median_run(runs: list[dict]) -> dict:
    """One system's rounds as one row: median seconds (and prefill / decode seconds); every
    round draws the same tokens (same seeds), so tokens/s is tokens / median seconds."""
    out = dict(runs[0])
    for key in ("seconds", "prefill_s", "decode_s"):
        if out.get(key) is not None:
            out[key] = statistics.median(r[key] for r in runs)
    out["seconds_rounds"] = [r["seconds"] for r in runs]
    return out


def _per_round(rounds: dict) -> str:
    """Each round's dynamic and static tokens/s over HF's in the same round."""
    lines = []
    for name, tps in rounds.items():
        if "hf" not in tps:
            continue
        for system in ("dynamic", "static"):
            ratios = [a / b for a, b in zip(tps[system], tps["hf"])]
            lines.append(f"{name}: {system} / hf per round: " + ", ".join(f"{x:.2f}x" for x in ratios)
                         + f" (median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines)


def _table(results: dict) -> str:
    lines = ["| workload | system | TP | tokens | tokens/s | vs hf | vs static | prefill s | decode s "
             "| live-row util. | KV MiB | lengths min/med/max | match hf |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for (name, system, tp), r in results.items():
        hf = results.get((name, "hf", 1))
        static = results.get((name, "static", tp))
        tps = r["tokens"] / r["seconds"]
        vs = lambda ref: "-" if ref is None else f"{tps / (ref['tokens'] / ref['seconds']):.2f}x"  # noqa: E731
        match = "-"
        if name == "greedy" and hf is not None:
            match = f"{sum(a == b for a, b in zip(r['responses'], hf['responses']))}/{len(hf['responses'])}"
        ln = r["lengths"]
        lines.append(f"| {name} | {system} | {tp} | {r['tokens']} | {tps:.0f} | {vs(hf)} | {vs(static)} "
                     f"| {fmt(r['prefill_s'], '.2f')} | {fmt(r['decode_s'], '.2f')} | {r['utilisation']:.2f} "
                     f"| {r['kv_mib']:.1f} | {ln['min']:.0f}/{ln['median']:.0f}/{ln['max']:.0f} | {match} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        return _worker(args)
    torch.set_num_threads(args.threads)
    cfg, loads = _setup(args)
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: dict = {}
    if args.legacy_src:  # first: before this process opens its own process group
        for (name, system), r in _legacy(args, loads).items():
            results[(name, system, 1)] = r
    hf = _hf_model(args.family, cfg)
    engine = _engine(hf)
    rounds: dict = {}
    for name, w in loads.items():
        systems = ([] if args.no_hf else ["hf"]) + ["static", "dynamic", "dynamic_budget"]
        runs: dict = {s: [] for s in systems}
        for k in range(args.rounds):  # the order rotates every round
            for system in systems[k % len(systems):] + systems[:k % len(systems)]:
                runs[system].append(_hf(hf, w, cfg) if system == "hf" else _ours(engine, w, system, cfg))
        for system, rs in runs.items():
            results[(name, system, 1)] = _median_run(rs)
        rounds[name] = {s: [r["tokens"] / r["seconds"] for r in rs] for s, rs in runs.items()}
    from tip_megatron.runtime import parallel

    parallel.destroy()
    if not args.no_tp2:
        from tip_megatron.testing.distributed import run_distributed

        print(_table(results), flush=True)  # the TP=1 rows, in case the TP=2 launch fails
        for attempt in range(2):  # a free port can be taken by another job before rendezvous
            try:
                tp2 = run_distributed(_tp2_rank, 2, args=(args.family, cfg, loads, args.threads),
                                      timeout_s=3000, start_method="spawn")[0]  # fork after gloo: SIGSEGV
                break
            except Exception as e:  # noqa: BLE001 - reported, then retried once
                print(f"TP=2 launch failed ({type(e).__name__}); {'retrying' if attempt == 0 else 'giving up'}")
                tp2 = {}
        for (name, system), r in tp2.items():
            results[(name, system, 2)] = r
    results = dict(sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])))
    machine = dict(_machine(args.threads), uptime_before=before)
    setup = dict(model=cfg, family=args.family, quick=args.quick, machine=machine,
                 params_m=sum(p.numel() for p in hf.parameters()) / 1e6,
                 workloads={k: {f: v for f, v in w.items() if f != "prompt_ids"} | dict(
                     prompt_lengths=[len(p) for p in w["prompt_ids"]]) for k, w in loads.items()})
    print(f"{setup['params_m']:.1f} M params ({args.family}), fp32, {args.threads} thread(s), "
          f"{machine['cpu']}; load before: {before}; after: {machine['uptime']}")
    print(_table(results))
    if args.rounds > 1:
        print(_per_round(rounds))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(workload=k[0], system=k[1], tp=k[2], **{f: v for f, v in r.items() if f != "responses"})
                for k, r in results.items()]
        Path(args.json).write_text(json.dumps(dict(setup=setup, results=rows, tokens_per_s_rounds=rounds),
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation throughput at TP=1: ours with KV cache, ours recomputing, HF `generate`.

Shapes: prompts [batch, P] (lengths drawn per row), `new_tokens` generated per row.

    python tools/bench_generate.py --quick                     # ~1 min on 2 cores
    python tools/bench_generate.py --json runs/bench_generate.json

Rows (one process; the same random fp32 weights, prompts, dtype and torch threads):
  ours_kv            tip_megatron.rollout.generate.generate, KV cache, layer_impl auto
                     (= functional layers on this local-spec model): the production path
  ours_kv_megatron   the same with megatron's own TransformerBlock (layer_impl=megatron)
  ours_nocache       the production path recomputing the whole sequence every step
  hf_generate    transformers' AutoModelForCausalLM.generate (DynamicCache, sdpa)
All decode greedily with no stop token, so every row produces batch * new_tokens tokens;
the `match` column counts the rows whose tokens equal hf_generate's. Repeats are
interleaved (ours, hf, ours, hf, ...) so load from other processes hits every row alike;
the median is reported, with min and max.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: ~7.1 M parameters: vocab 8192, hidden 256, 4 layers, GQA 8/4 heads, SwiGLU 704.
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
             rms_norm_eps=1e-6, initializer_range=0.05, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=0)
QUICK_MODEL = dict(MODEL, vocab_size=2048, hidden_size=128, intermediate_size=352,
                   num_hidden_layers=2)
ROWS = ("ours_kv", "ours_kv_megatron", "ours_nocache", "hf_generate")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, 64 new tokens, 1 repeat")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--family", default="llama", choices=("llama", "qwen2", "qwen3"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (quick: 64)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3, quick 1)")
    # One thread by default: on a shared 2-core machine, multi-threaded ops of a small model
    # spend more time waiting for a descheduled OpenMP worker than computing, and that noise
    # swamps the comparison. Every row runs with the same setting.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    return p.parse_args(argv)


def _hf_model(family: str, cfg: dict):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**cfg)).eval()


def _engine(hf):
    """Our TP=1 model holding the HF weights (through the converter's name tables)."""
    from tip_megatron import parallel
    from tip_megatron.convert.mapping import all_rules
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.arch import ModelArch
    from tip_megatron.models.state import load_full_state_dict

    groups = parallel.initialize(parallel.ParallelLayout(tp=1, pp=1))
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    full = {r.mcore: r.to_full(arch, [sd[n] for n in r.hf]) for r in all_rules(arch)}
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    load_full_state_dict(chunks, full, groups, arch)
    return chunks, groups, arch


def _prompts(batch: int, lengths: tuple[int, int], vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=gen).tolist()
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in sizes]


def _runners(hf, engine, prompts, new_tokens):
    """name -> callable() returning [batch] lists of generated ids."""
    from tip_megatron.rollout.generate import GenerationConfig, generate

    chunks, groups, arch = engine

    def ours(kv: bool, impl: str = "auto"):
        cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, use_kv_cache=kv,
                               layer_impl=impl)
        r = generate(chunks, groups, arch, prompts, cfg, seed=0)
        return [r.response(i) for i in range(r.num_rows)]

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != -1).long()
    for i, p in enumerate(prompts):
        mask[i, : width - len(p)] = 0

    @torch.no_grad()
    def hf_generate():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, width:].tolist()

    return {"ours_kv": lambda: ours(True), "ours_kv_megatron": lambda: ours(True, "megatron"),
            "ours_nocache": lambda: ours(False),
            "hf_generate": hf_generate}


def _time(fn) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _measure(runners: dict, rows: list[str], repeats: int, tokens: int) -> dict:
    for name in rows:  # warm-up: allocator, lru caches, lazy imports
        runners[name]()
    times: dict[str, list[float]] = {name: [] for name in rows}
    outputs: dict[str, list] = {}
    for _ in range(repeats):
        for name in rows:
            seconds, outputs[name] = _time(runners[name])
            times[name].append(seconds)
    ref = outputs.get("hf_generate")
    result = {}
    for name in rows:
        med = statistics.median(times[name])
        result[name] = dict(
            tokens_per_s=tokens / med, seconds_median=med, seconds_min=min(times[name]),
            seconds_max=max(times[name]), tokens=tokens,
            rows_matching_hf=None if ref is None else sum(a == b for a, b in zip(outputs[name], ref)))
    return result


def _machine(threads: int) -> dict:
    cpu = py_platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
                transformers=transformers.__version__, python=py_platform.python_version(),
                load_average_1m=os.getloadavg()[0])


def _table(result: dict, setup: dict) -> str:
    head = (f"batch {setup['batch']}, {setup['new_tokens']} new tokens, prompts "
            f"{setup['prompt_lengths']}, {setup['params_m']:.1f} M params ({setup['family']}), fp32, "
            f"{setup['machine']['torch_threads']} threads, {setup['machine']['cpu']}")
    lines = [head, f"{'row':<18}{'tokens/s':>10}{'median s':>10}{'min s':>8}{'max s':>8}"
             f"{'vs hf':>8}{'match':>7}"]
    hf = result.get("hf_generate", {}).get("tokens_per_s")
    for name, r in result.items():
        ratio = f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-"
        match = "-" if r["rows_matching_hf"] is None else f"{r['rows_matching_hf']}/{setup['batch']}"
        lines.append(f"{name:<18}{r['tokens_per_s']:>10.0f}{r['seconds_median']:>10.2f}"
                     f"{r['seconds_min']:>8.2f}{r['seconds_max']:>8.2f}{ratio:>8}{match:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    cfg = dict(QUICK_MODEL if args.quick else MODEL)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], args.prompt_len[1] + new_tokens)
    if args.family == "qwen3":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    hf = _hf_model(args.family, cfg)
    engine = _engine(hf)
    prompts = _prompts(args.batch, tuple(args.prompt_len), cfg["vocab_size"])
    runners = _runners(hf, engine, prompts, new_tokens)
    result = _measure(runners, args.rows, repeats, args.batch * new_tokens)
    setup = dict(batch=args.batch, new_tokens=new_tokens, prompt_lengths=[len(p) for p in prompts],
                 family=args.family, params_m=sum(p.numel() for p in hf.parameters()) / 1e6,
                 repeats=repeats, quick=args.quick, model=cfg, machine=_machine(torch.get_num_threads()))
    print(_table(result, setup))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(setup=setup, results=result), indent=2) + "\n")
    from tip_megatron import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

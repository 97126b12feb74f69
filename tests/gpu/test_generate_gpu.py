"""GPU tier of generation (marked `gpu`, skipped without CUDA).

fp32 local spec on CUDA: greedy == HF transformers on the same GPU, both layer
implementations, both engines, KV cache == recompute; sampled with stop ids, the dynamic
engine under a batch budget, and with decode attention per run of rows, == the static
engine. bf16: runs, finite, reproducible under a seed.
Transformer Engine spec (when importable): `auto` falls back to megatron's layers and the
greedy tokens equal HF's. CUDA graph of the decode step (local spec, static engine):
the same tokens as the eager step (fp32), greedy == HF. Not yet run on a GPU.
"""
import pytest
import torch

from tip_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 30, 40, 17]]
NEW = 12


def _hf_model():
    cfg = transformers.Qwen3Config(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=12, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _gpu_checks(spec):
    from tip_megatron.runtime import parallel
    from tip_megatron.checkpoint.hf.mapping import all_rules
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.arch import ModelArch
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.rollout.decode import resolve_layer_impl
    from tip_megatron.rollout.generate import GenerationConfig, generate

    hf = _hf_model().cuda()
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]).cuda(), attention_mask=torch.ones(1, len(p)).long().cuda(),
                           max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    sd = {k: v.cpu() for k, v in hf.state_dict().items()}
    full = {r.mcore: r.to_full(arch, [sd[n] for n in r.hf]) for r in all_rules(arch)}
    g = parallel.initialize(parallel.ParallelLayout(tp=1))
    out = {"ref": ref}
    for dtype in (torch.float32, torch.bfloat16):
        chunks = build_model(arch, g, BuildOptions(spec=spec, params_dtype=dtype, init_weights=False))
        load_full_state_dict(chunks, full, g, arch)
        run = lambda **kw: generate(chunks, g, arch, PROMPTS,  # noqa: E731
                                    GenerationConfig(max_new_tokens=NEW, **kw), seed=3)
        res = {"impl": resolve_layer_impl(chunks, "auto")}
        for name, kw in {"greedy": dict(temperature=0.0),
                         "greedy_megatron": dict(temperature=0.0, layer_impl="megatron"),
                         "greedy_nocache": dict(temperature=0.0, use_kv_cache=False),
                         "greedy_static": dict(temperature=0.0, engine="static"),
                         "spread": dict(temperature=1.0, n=3, stop_ids=tuple(range(2, 250, 9)),
                                        max_batch_tokens=4 * (7 + NEW)),
                         "spread_static": dict(temperature=1.0, n=3, stop_ids=tuple(range(2, 250, 9)),
                                               engine="static"),
                         "sampled": dict(temperature=1.0, top_p=0.9, n=2),
                         "sampled_again": dict(temperature=1.0, top_p=0.9, n=2),
                         **_graph_cases(spec)}.items():
            r = run(**kw)
            res[name] = ([r.response(i) for i in range(r.num_rows)], r.logprobs.float().cpu())
        # Decode attention per run of rows, every run on its own (the CUDA call-cost estimate
        # would merge this tiny model's runs into one call).
        from tip_megatron.rollout import kv_cache
        saved = dict(kv_cache.SEGMENT_CALL_BYTES)
        kv_cache.SEGMENT_CALL_BYTES["cuda"] = 0
        try:
            r = run(temperature=1.0, n=3, stop_ids=tuple(range(2, 250, 9)))
        finally:
            kv_cache.SEGMENT_CALL_BYTES.update(saved)
        assert r.stats["attention_segments"] > r.stats["num_decode_steps"]
        res["spread_segments"] = ([r.response(i) for i in range(r.num_rows)], r.logprobs.float().cpu())
        out[str(dtype)] = res
    return out


def _graph_cases(spec):
    """The CUDA-graph decode step (functional layers only: the local spec)."""
    if spec != "local":
        return {}
    return {"greedy_graph": dict(temperature=0.0, engine="static", cuda_graph=True),
            "spread_graph": dict(temperature=1.0, n=3, stop_ids=tuple(range(2, 250, 9)),
                                 engine="static", cuda_graph=True)}


def _check(out, fp32_impl):
    fp32 = out[str(torch.float32)]
    assert fp32["impl"] == fp32_impl
    for name in ("greedy", "greedy_megatron", "greedy_nocache", "greedy_static"):
        assert fp32[name][0] == out["ref"], name
    # The dynamic engine (compaction, admission under a 4-row budget) == the static engine.
    assert fp32["spread"][0] == fp32["spread_static"][0]
    torch.testing.assert_close(fp32["spread"][1], fp32["spread_static"][1], atol=1e-4, rtol=0)
    # Decode attention per run of rows (SDPA's GPU kernels on slices of the cache) == static.
    assert fp32["spread_segments"][0] == fp32["spread_static"][0]
    torch.testing.assert_close(fp32["spread_segments"][1], fp32["spread_static"][1], atol=1e-4, rtol=0)
    if "greedy_graph" in fp32:  # CUDA graph replay == eager: same tokens, log-probs to rounding
        assert fp32["greedy_graph"][0] == out["ref"]
        assert fp32["spread_graph"][0] == fp32["spread_static"][0]
        torch.testing.assert_close(fp32["spread_graph"][1], fp32["spread_static"][1], atol=1e-4, rtol=0)
    bf16 = out[str(torch.bfloat16)]
    assert bf16["sampled"][0] == bf16["sampled_again"][0]
    assert torch.isfinite(bf16["sampled"][1]).all()


def test_local_spec_generation_on_cuda():
    _check(run_distributed(_gpu_checks, 1, args=("local",), start_method="spawn")[0], "functional")


def test_te_spec_generation_on_cuda():
    pytest.importorskip("transformer_engine.pytorch")
    _check(run_distributed(_gpu_checks, 1, args=("te",), start_method="spawn")[0], "megatron")

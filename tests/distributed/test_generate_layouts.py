"""Generation under TP/PP layouts against HF transformers' own `generate`.

Tiny random HF models (llama with tied embeddings, qwen2, qwen3; built from configs, no
downloads) are converted into the engine with the HF converter's name tables. Each layout
runs in ONE spawned group that generates for every family: greedy (compared token for
token with HF's greedy `generate`, one prompt at a time, while ours runs the prompts of
different lengths as one left-padded batch), greedy with a stop id (compared with HF's
`eos_token_id` stopping), and sampled with top-k/top-p and n=2 (compared across layouts
and between the functional and megatron layer implementations: the sampler's draw is a
function of (seed, step, row id, token count), not of the layout), and sampled with stop
ids under a batch budget (the dynamic engine compacts and admits) against the static engine.
"""
import pytest
import torch

from tip_megatron.testing.distributed import run_distributed

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 30, 40, 17]]
NEW = 12
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, n=2)
# Stop ids over the vocabulary: sampled responses end at spread lengths; a budget of 3 rows
# makes the dynamic engine compact its batch and admit prompts as rows finish.
SPREAD = dict(temperature=1.0, n=2, stop_ids=tuple(range(3, 250, 10)), max_batch_tokens=3 * (5 + NEW + 2))
FAMILIES = ("llama", "qwen2", "qwen3")
# name -> ([(tp, pp, vpp) run one after another in the same group], families). TP2 x PP2
# (4 ranks on a 2-core machine) runs one family: llama, whose tied embeddings cross stages.
LAYOUTS = {
    "tp1": ([(1, 1, None)], FAMILIES),
    "tp2": ([(2, 1, None)], FAMILIES),
    "pp2": ([(1, 2, None), (1, 2, 2)], FAMILIES),
    "tp2_pp2": ([(2, 2, None)], ("llama",)),
}


def _hf_model(family: str):
    common = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                  rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0, tie_word_embeddings=family == "llama")
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config}[family]
    if family == "qwen3":
        common["head_dim"] = 12
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config(**common)).eval()


def _hf_to_full(hf, arch):
    """HF state dict -> the engine's full naming, through the converter's name tables."""
    from tip_megatron.checkpoint.hf.mapping import rules_of

    sd = hf.state_dict()
    full = {}
    for layer in [None, *range(arch.num_layers)]:
        for rule in rules_of(arch, layer):
            full[rule.mcore] = rule.to_full(arch, [sd[name] for name in rule.hf])
    return full


def _hf_greedy(hf, eos=None):
    out = []
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    if eos is not None:  # HF pads after EOS: cut there (EOS kept)
        out = [r[:r.index(eos) + 1] if eos in r else r for r in out]
    return out


@pytest.fixture(scope="module")
def models():
    from tip_megatron.models.arch import ModelArch

    out = {}
    for family in FAMILIES:
        hf = _hf_model(family)
        arch = ModelArch.from_hf_config(hf.config.to_dict())
        with torch.no_grad():
            greedy = _hf_greedy(hf)
            stop = greedy[0][3]
            out[family] = dict(arch=arch, full=_hf_to_full(hf, arch), greedy=greedy,
                               stop=stop, greedy_stop=_hf_greedy(hf, eos=stop))
    return out


def _generate_all(models, layouts, families):
    from tip_megatron.runtime import parallel
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.rollout.generate import GenerationConfig, generate

    results = {}
    for tp, pp, vpp in layouts:
        g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp, vpp=vpp))
        for family in families:
            m = models[family]
            arch = m["arch"]
            chunks = build_model(arch, g, BuildOptions(init_weights=False))
            load_full_state_dict(chunks, m["full"], g, arch)
            run = lambda **kw: generate(chunks, g, arch, PROMPTS,  # noqa: E731
                                        GenerationConfig(max_new_tokens=NEW, **kw), seed=11, step=3)
            results[(vpp, family)] = dict(
                greedy=run(temperature=0.0), greedy_stop=run(temperature=0.0, stop_ids=(m["stop"],)),
                sampled=run(**SAMPLED), sampled_megatron=run(**SAMPLED, layer_impl="megatron"),
                spread=run(**SPREAD, check_logprobs=True), spread_static=run(**{**SPREAD, "engine": "static"}))
    return results


@pytest.fixture(scope="module")
def reference(models):
    return run_distributed(_generate_all, 1, args=(models, *LAYOUTS["tp1"]))[0]


def _responses(rollouts):
    return [rollouts.response(row) for row in range(rollouts.num_rows)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_matches_hf_and_sampling_matches_tp1(layout, models, reference):
    tp, pp, _ = LAYOUTS[layout][0][0]
    if layout == "tp1":
        per_rank = [reference]
    else:
        per_rank = run_distributed(_generate_all, tp * pp, args=(models, *LAYOUTS[layout]))
    for rank, res in enumerate(per_rank):
        for (vpp, family), out in res.items():
            where = f"{layout} vpp={vpp} rank {rank} {family}"
            assert _responses(out["greedy"]) == models[family]["greedy"], where
            assert _responses(out["greedy_stop"]) == models[family]["greedy_stop"], where
            assert out["greedy_stop"].stopped.tolist() == [
                models[family]["stop"] in r for r in models[family]["greedy"]], where
            base = reference[(None, family)]["sampled"]
            for name in ("sampled", "sampled_megatron"):
                assert torch.equal(out[name].token_ids, base.token_ids), (where, name)
                assert torch.equal(out[name].response_mask, base.response_mask), (where, name)
                torch.testing.assert_close(out[name].logprobs, base.logprobs, atol=1e-4, rtol=0,
                                           msg=f"{where} {name}")
            # Continuous batching (rows leave, prompts join) under this layout draws what the
            # static engine draws at TP=1.
            base = reference[(None, family)]["spread_static"]
            assert out["spread"].stats["capacity_rows"] == 3, where
            gap = out["spread"].logprob_gap  # engine vs GPTModel.forward through this layout
            assert gap["tokens"] > 0 and gap["max"] <= 1e-5, (where, gap)
            for name in ("spread", "spread_static"):
                assert torch.equal(out[name].token_ids, base.token_ids), (where, name)
                assert torch.equal(out[name].stopped, base.stopped), (where, name)
                torch.testing.assert_close(out[name].logprobs, base.logprobs, atol=1e-4, rtol=0,
                                           msg=f"{where} {name}")
        spread = reference[(None, FAMILIES[0])]["spread"].response_lengths
        assert spread.min() < spread.max()  # the lengths do spread

"""In-engine generation at TP=1: KV cache vs recompute, stopping, masks, n samples, seeds,
the dynamic engine (rows leave, prompts join) against the static one, batch invariance,
the train/inference log-prob gap.

All model checks run in ONE forked rank (`_checks`), whose results the tests below read.
HF parity and TP/PP layouts: tests/distributed/test_generate.py.
"""
import pytest
import torch

from tip_megatron.rollout.generate import GenerationConfig
from tip_megatron.rollout.static import attention_mask as _attention_mask
from tip_megatron.rollout.static import left_pad as _left_pad
from tip_megatron.rollout.static import pack as _pack
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 30, 40, 17]]
NEW = 12
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9, n=3)
STOPS = tuple(range(1, 250, 12))  # 21 of 250 ids: a near-uniform random model stops ~8% per token


def _checks(arch):
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.rollout.generate import generate
    from tip_megatron.rollout.kv_cache import CachedCoreAttention

    g = parallel.initialize(parallel.ParallelLayout(1, 1), seed=7)
    chunks = build_model(arch, g)
    run = lambda prompts=PROMPTS, seed=1, step=0, **kw: generate(  # noqa: E731
        chunks, g, arch, prompts, GenerationConfig(max_new_tokens=NEW, pad_id=0, **kw), seed, step)
    out = {"greedy": run(temperature=0.0), "greedy_nocache": run(temperature=0.0, use_kv_cache=False),
           "sampled": run(**SAMPLED), "sampled_nocache": run(**SAMPLED, use_kv_cache=False),
           "sampled_again": run(**SAMPLED), "sampled_step1": run(**SAMPLED, step=1),
           "sampled_seed2": run(**SAMPLED, seed=2),
           "greedy_megatron": run(temperature=0.0, layer_impl="megatron"),
           "sampled_megatron": run(**SAMPLED, layer_impl="megatron"),
           "sampled_megatron_nocache": run(**SAMPLED, layer_impl="megatron", use_kv_cache=False)}
    out["alone"] = run(prompts=PROMPTS[1:2], temperature=0.0)
    spread = dict(temperature=1.0, n=4, stop_ids=STOPS)  # responses end at spread lengths
    out["spread_static"] = run(**spread, engine="static")
    out["spread"] = run(**spread, check_logprobs=True)
    # Room for one prompt's rows at a time (then two): prompts are admitted as rows finish.
    for rows in (4, 9):
        out[f"spread_cap{rows}"] = run(**spread, max_batch_tokens=rows * (max(map(len, PROMPTS)) + NEW))
    # Decode attention per run of rows however cheap a call is (the tiny model's runs would
    # otherwise merge into one): every run of equal columns over its own keys.
    from tip_megatron.rollout import kv_cache
    saved = dict(kv_cache.SEGMENT_CALL_BYTES)
    kv_cache.SEGMENT_CALL_BYTES["cpu"] = 0
    try:
        out["spread_segments"] = run(**spread, check_logprobs=True)
        out["spread_segments_cap9"] = run(**spread, max_batch_tokens=9 * (max(map(len, PROMPTS)) + NEW))
    finally:
        kv_cache.SEGMENT_CALL_BYTES.update(saved)
    # A row draws the same tokens alone (same global row ids via row_offset), reversed order.
    out["spread_parts"] = [generate(chunks, g, arch, [PROMPTS[i]], GenerationConfig(
        max_new_tokens=NEW, pad_id=0, **spread), 1, 0, row_offset=4 * i) for i in range(len(PROMPTS))][::-1]
    out["topp_gap"] = run(temperature=0.8, top_p=0.9, n=2, check_logprobs=True).logprob_gap
    stop = out["greedy"].response(0)[3]
    out["stop_id"] = stop
    out["stopped"] = run(temperature=0.0, stop_ids=(stop,))
    out["stopped_nocache"] = run(temperature=0.0, stop_ids=(stop,), use_kv_cache=False)
    cores = [layer.self_attention.core_attention for layer in chunks[0].decoder.layers]
    out["restored"] = chunks[0].training and not any(isinstance(c, CachedCoreAttention) for c in cores)
    out["errors"] = {}
    for name, kw in {"too_long": dict(prompts=[[1] * 60]), "bad_id": dict(prompts=[[1, 250]]),
                     "empty": dict(prompts=[[1], []]), "bad_stop": dict(stop_ids=(300,)),
                     "budget": dict(n=2, max_batch_tokens=30)}.items():
        try:
            run(temperature=0.0, **kw)
            out["errors"][name] = None
        except ValueError as e:
            out["errors"][name] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_checks, 1, args=(tiny_arch("llama"),))[0]


def _same(a, b):
    return torch.equal(a.token_ids, b.token_ids) and torch.equal(a.response_mask, b.response_mask)


def test_kv_cache_matches_recompute(results):
    assert _same(results["greedy"], results["greedy_nocache"])
    assert _same(results["sampled"], results["sampled_nocache"])
    torch.testing.assert_close(results["sampled"].logprobs, results["sampled_nocache"].logprobs,
                               atol=1e-4, rtol=0)


def test_functional_layers_match_megatron_layers(results):
    """The functional decode layers and megatron's TransformerBlock give the same tokens."""
    assert _same(results["greedy"], results["greedy_megatron"])
    for name in ("sampled_megatron", "sampled_megatron_nocache"):
        assert _same(results["sampled"], results[name]), name
        torch.testing.assert_close(results["sampled"].logprobs, results[name].logprobs,
                                   atol=1e-5, rtol=0)


def test_padding_does_not_change_a_prompt(results):
    alone, batch = results["alone"], results["greedy"]
    assert alone.response(0) == batch.response(1)


def test_output_layout_and_masks(results):
    r = results["sampled"]
    n = SAMPLED["n"]
    assert r.num_rows == len(PROMPTS) * n
    assert r.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert r.sample_index.tolist() == list(range(n)) * len(PROMPTS)
    for row in range(r.num_rows):
        prompt = PROMPTS[row // n]
        p, k = int(r.prompt_lengths[row]), int(r.response_lengths[row])
        assert p == len(prompt) and k == NEW and not r.stopped[row]
        assert r.token_ids[row, :p].tolist() == prompt
        tail = r.token_ids.shape[1] - p - k
        assert r.response_mask[row].tolist() == [False] * p + [True] * k + [False] * tail
        assert (r.logprobs[row, p:p + k] < 0).all() and (r.logprobs[row, :p] == 0).all()
        assert (r.token_ids[row, p + k:] == 0).all()
    assert r.token_ids.shape[1] == max(map(len, PROMPTS)) + NEW


def test_stop_ids_end_a_sample(results):
    full, r, stop = results["greedy"], results["stopped"], results["stop_id"]
    assert _same(r, results["stopped_nocache"])
    for row in range(r.num_rows):
        ref = full.response(row)
        expect = ref[:ref.index(stop) + 1] if stop in ref else ref
        assert r.response(row) == expect
        assert bool(r.stopped[row]) == (stop in ref)
        p, k = int(r.prompt_lengths[row]), int(r.response_lengths[row])
        assert k == len(expect) and r.response_mask[row].sum() == k
        assert (r.token_ids[row, p + k:] == 0).all() and not r.response_mask[row, p + k:].any()
    assert r.response(0)[-1] == stop


def test_samples_differ_and_seeds_are_deterministic(results):
    r = results["sampled"]
    for prompt in range(len(PROMPTS)):
        responses = {tuple(r.response(prompt * SAMPLED["n"] + s)) for s in range(SAMPLED["n"])}
        assert len(responses) == SAMPLED["n"]
    assert _same(r, results["sampled_again"])
    assert torch.equal(r.logprobs, results["sampled_again"].logprobs)
    assert not torch.equal(r.token_ids, results["sampled_step1"].token_ids)
    assert not torch.equal(r.token_ids, results["sampled_seed2"].token_ids)


def test_model_is_restored(results):
    assert results["restored"]


def test_input_errors_are_named(results):
    errors = results["errors"]
    assert "max_position_embeddings=64" in errors["too_long"]
    assert "250" in errors["bad_id"]
    assert "non-empty" in errors["empty"]
    assert "stop_ids" in errors["bad_stop"]
    assert "max_batch_tokens=30" in errors["budget"] and "n=2" in errors["budget"]


def _assert_same_samples(a, b, where=""):
    assert _same(a, b), where
    assert torch.equal(a.stopped, b.stopped) and torch.equal(a.response_lengths, b.response_lengths), where
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0, msg=where)


def test_dynamic_engine_draws_what_the_static_engine_draws(results):
    """Rows leave the batch as they stop and prompts join as room frees up; every row's
    tokens equal the static engine's (all rows decoded until the longest ends)."""
    static, spread = results["spread_static"], results["spread"]
    lengths = spread.response_lengths
    assert spread.stopped.any() and lengths.min() < lengths.max()  # the workload is spread
    for name in ("spread", "spread_cap4", "spread_cap9"):
        _assert_same_samples(results[name], static, name)
    assert _same(results["greedy"], results["greedy_nocache"])  # greedy: dynamic vs recompute
    # Compute follows the live rows: the static engine computes every row every step.
    assert spread.stats["row_steps"] == int(lengths.sum()) - spread.num_rows
    assert static.stats["row_steps"] == spread.num_rows * (int(lengths.max()) - 1)
    assert results["spread_cap4"].stats["capacity_rows"] == 4
    assert results["spread_cap4"].stats["num_prefills"] == len(PROMPTS)
    assert spread.stats["num_prefills"] == 1  # one prefill per prompt: n rows share it


def test_decode_attention_per_run_of_rows_draws_the_same_samples(results):
    """Rows of different lengths attend per run over their own keys (`key_segments`): the
    same samples as one call over the longest row's keys, and fewer key columns read."""
    static, one = results["spread_static"], results["spread"]
    for name in ("spread_segments", "spread_segments_cap9"):
        _assert_same_samples(results[name], static, name)
    seg = results["spread_segments"]
    assert seg.logprob_gap["max"] <= 1e-5, seg.logprob_gap
    assert seg.stats["attention_segments"] > seg.stats["num_decode_steps"]  # really split
    assert seg.stats["key_columns"] < seg.stats["key_columns_longest"]
    assert one.stats["key_columns"] <= one.stats["key_columns_longest"]


def test_samples_do_not_depend_on_the_batch(results):
    """Each prompt alone (its rows keep their global ids through row_offset) draws what it
    drew in the full batch."""
    full, n = results["spread"], 4
    for i, part in enumerate(results["spread_parts"][::-1]):
        for s in range(n):
            assert part.response(s) == full.response(i * n + s), (i, s)
        torch.testing.assert_close(part.response_lengths, full.response_lengths[i * n:(i + 1) * n])


def test_engine_and_training_forward_agree_on_logprobs(results):
    """The sampled tokens' log-probs under the KV-cached engine equal those of megatron's
    GPTModel.forward over the whole rollout (fp32 rounding)."""
    for gap in (results["spread"].logprob_gap, results["topp_gap"]):
        assert gap["tokens"] > 0
        assert gap["max"] <= 1e-5 and gap["mean"] <= 1e-6, gap


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("n", 0), ("temperature", -1.0),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("layer_impl", "fast"), ("engine", "paged"),
                                         ("max_batch_tokens", -1), ("vocab_limit", -1)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


_ENV = dict(env="tip_megatron.testing.envs:ScriptedEnv", turn_stop=("</call>",))


@pytest.mark.parametrize("field,value", [("env", "no_colon"), ("env", "mod:"), ("max_turns", 0),
                                         ("turn_stop", ()), ("turn_stop", ("",)),
                                         ("env_timeout_s", 0.0), ("env_args", [1]),
                                         ("observation_format", "json"),
                                         ("cuda_graph", True)])
def test_multi_turn_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match="env|" + field):
        GenerationConfig(**{**_ENV, field: value})
    GenerationConfig(**_ENV)  # the base is accepted


def test_config_fields_are_deliberate():
    assert set(GenerationConfig.__dataclass_fields__) == {
        "max_new_tokens", "temperature", "top_k", "top_p", "n", "stop_ids", "pad_id", "use_kv_cache",
        "layer_impl", "engine", "max_batch_tokens", "check_logprobs", "cuda_graph", "keep_hidden",
        "vocab_limit", "env", "env_args", "max_turns", "turn_stop", "observation_format",
        "env_timeout_s"}


def test_attention_mask_left_padding():
    pads = torch.tensor([2, 0])
    prefill = _attention_mask(pads, start=0, sq=4)[:, 0]
    assert prefill[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert prefill[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    decode = _attention_mask(pads, start=4, sq=1)[:, 0, 0]
    assert decode.int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_pack_turns_left_padding_into_right_padding():
    ids, pads = _left_pad([[7, 8, 9], [5]], pad_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and pads.tolist() == [0, 2]
    tokens = torch.cat([ids, torch.tensor([[1, 2], [3, 0]])], dim=1)
    logprobs = torch.zeros(2, 5)
    logprobs[:, 3:] = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    r = _pack(tokens, logprobs, pads, 3, torch.tensor([2, 1]), torch.tensor([False, True]),
              GenerationConfig(pad_id=0))
    assert r.token_ids.tolist() == [[7, 8, 9, 1, 2], [5, 3, 0, 0, 0]]
    assert r.response_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    assert r.logprobs.tolist() == [[0, 0, 0, -1, -2], [0, -3, 0, 0, 0]]
    assert r.prompt_lengths.tolist() == [3, 1] and r.response(1) == [3]

"""Multi-turn generation: KV continuity across turns, at TP1, TP2, PP2 and PP2 x VPP2,
both engines.

A tiny random HF llama (built from a config, no downloads) is loaded into the engine; a
scripted environment (tip_megatron.testing.envs) answers every turn with ids that depend
on the prompt, the turn index and the turn's tokens. Checks, per layout and engine:
- greedy: every generated token equals the argmax of HF's plain forward over the row's
  whole history (prompt, earlier turns, observations: no cache), i.e. continuing the
  cache across turns and prefilling only the observations changes nothing;
- the transcript replays: the tokens between two turns are exactly what the environment
  answers to the turn before them; masks split the tokens after the prompt into
  generated (response_mask) and observation tokens;
- sampled (n=2): the same tokens on every layout and engine as the TP1 dynamic engine,
  and the sampled tokens' log-probs equal the training forward's (`check_logprobs`);
- teacher parity: the teacher pass's final hidden states of the interleaved rows equal
  HF's plain forward of each whole row; so do the student hidden states the engines keep
  for `selection.prepass_source=generation` (`keep_hidden`) at the positions that
  predicted each generated token.
"""
import pytest
import torch

from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.envs import scripted_observation
from tip_megatron.rollout.env import Turn

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 30, 40, 17], [60, 61]]
NEW = 30
TURN_STOP = tuple(f"<{i}>" for i in range(3, 250, 9))  # 28 of 250 ids end a turn
EOS = (2, 125)
ENV = dict(env="tip_megatron.testing.envs:ScriptedEnv", env_args={"end_after": 1}, max_turns=3,
           turn_stop=TURN_STOP, stop_ids=EOS, max_new_tokens=NEW)
LAYOUTS = {"tp1": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, None), "pp2_vpp2": (1, 2, 2)}


def _hf_model():
    cfg = transformers.LlamaConfig(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
        pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _records():
    from tip_megatron.data.sources import PromptRecord

    return [PromptRecord(str(i), p, None, "", where=f"prompts.jsonl, line {i + 1}")
            for i, p in enumerate(PROMPTS)]


def _generate(full, arch, tp, pp, vpp=None):
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.rollout.generate import Episodes, GenerationConfig, generate
    from tip_megatron.runtime import parallel
    from tip_megatron.testing.envs import IdTokenizer

    g = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp, vpp=vpp))
    chunks = build_model(arch, g, BuildOptions(init_weights=False))
    load_full_state_dict(chunks, full, g, arch)
    out = {}
    for engine in ("dynamic", "static"):
        for name, kw in (("greedy", dict(temperature=0.0, keep_hidden=True)),
                         ("sampled", dict(temperature=1.0, top_k=50, n=2, check_logprobs=True))):
            config = GenerationConfig(**ENV, **kw, engine=engine)
            out[(engine, name)] = generate(chunks, g, arch, PROMPTS, config, seed=5, step=1,
                                           episodes=Episodes(_records(), IdTokenizer(250)))
    # Teacher parity: the teacher pass (forward-only pipeline schedule) over the interleaved
    # rows, as the trainer cuts them into micro-batches: final hidden states [s, b, h].
    from tip_megatron.distill.step import teacher_hidden_states
    from tip_megatron.train.batches import make_microbatches

    rolled = out[("dynamic", "greedy")]
    mbs = make_microbatches(rolled.token_ids, rolled.response_mask,
                            torch.arange(rolled.num_rows), micro_batch_size=2)
    hidden = teacher_hidden_states(chunks, g, mbs, seq_length=rolled.token_ids.shape[1], micro_batch_size=2)
    out["teacher_hidden"] = torch.cat([h.transpose(0, 1) for h in hidden]) if hidden else None
    # Room for 3 rows of 8: rows leave, prompts join while others wait on environments.
    config = GenerationConfig(**ENV, temperature=1.0, top_k=50, n=2, max_batch_tokens=3 * (7 + NEW))
    out[("dynamic_cap3", "sampled")] = generate(chunks, g, arch, PROMPTS, config, seed=5, step=1,
                                                episodes=Episodes(_records(), IdTokenizer(250)))
    # The KV cache off (every step recomputes the whole row): the static engine's reference.
    config = GenerationConfig(**ENV, temperature=0.0, engine="static", use_kv_cache=False, keep_hidden=True)
    out[("nocache", "greedy")] = generate(chunks, g, arch, PROMPTS, config, seed=5, step=1,
                                          episodes=Episodes(_records(), IdTokenizer(250)))
    return out


@pytest.fixture(scope="module")
def model():
    from tip_megatron.models.arch import ModelArch
    from tests.distributed.test_generate_layouts import _hf_to_full

    hf = _hf_model()
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    return hf, arch, _hf_to_full(hf, arch)


@pytest.fixture(scope="module")
def reference(model):
    _, arch, full = model
    return run_distributed(_generate, 1, args=(full, arch, 1, 1))[0]


def _segments(out, row):
    """[(kind, ids)] of the tokens after the prompt: ('gen', turn ids) / ('obs', ids)."""
    start, end = int(out.prompt_lengths[row]), int(out.prompt_lengths[row] + out.response_lengths[row])
    parts = []
    for col in range(start, end):
        kind = "gen" if bool(out.response_mask[row, col]) else "obs"
        tok = int(out.token_ids[row, col])
        if parts and parts[-1][0] == kind and (kind == "obs" or parts[-1][2] == int(out.turn_ids[row, col])):
            parts[-1][1].append(tok)
        else:
            parts.append([kind, [tok], int(out.turn_ids[row, col])])
    return parts


def _check_transcript(out, where):
    """Observations are the environment's answers; turn ids, masks and counts agree."""
    n = out.num_rows // len(PROMPTS)
    for row in range(out.num_rows):
        key = row // n
        parts = _segments(out, row)
        assert parts and parts[0][0] == "gen", (where, row)
        gens = [p for p in parts if p[0] == "gen"]
        assert [p[2] for p in gens] == list(range(len(gens))), (where, row, parts)
        assert int(out.num_turns[row]) == len(gens), (where, row)
        for k, part in enumerate(parts):
            if part[0] != "obs":
                continue
            prev = parts[k - 1]
            want = scripted_observation(key, Turn(prev[2], tuple(prev[1]), ""))
            # cut only when the budget ran out
            assert part[1] == want[:len(part[1])], (where, row, k)
            assert part[1] == want or int(out.response_lengths[row]) == NEW, (where, row, k)
        obs = out.observation_mask[row]
        assert int(obs.sum() + out.response_mask[row].sum()) == int(out.response_lengths[row]), (where, row)
        assert not bool((out.response_mask[row] & obs).any())
    assert torch.equal(out.turn_ids >= 0, out.response_mask), where


def _check_teacher_vs_hf(hf, out, hidden, where):
    """The teacher's final hidden states of each interleaved row = HF's plain forward of
    the whole row (observations included as context), at every real position."""
    with torch.no_grad():
        for row in range(out.num_rows):
            end = int(out.prompt_lengths[row] + out.response_lengths[row])
            want = hf.model(out.token_ids[row, :end][None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[row, :end], want, atol=1e-4, rtol=1e-4,
                                       msg=f"{where} row {row}")


def _check_greedy_vs_hf(hf, out, where):
    """Every generated token is HF's argmax over the row's whole history; with
    `keep_hidden` the kept hidden states are HF's final hidden states at the positions
    that predicted them (a turn's first token: the last observation position)."""
    kept = []
    with torch.no_grad():
        for row in range(out.num_rows):
            end = int(out.prompt_lengths[row] + out.response_lengths[row])
            ids = out.token_ids[row, :end]
            run = hf(ids[None], output_hidden_states=True)
            gen = out.response_mask[row, :end].nonzero().flatten()
            assert torch.equal(run.logits[0][gen - 1].argmax(-1), ids[gen]), (where, row)
            kept.append(run.hidden_states[-1][0][gen - 1])
    if out.response_hidden is not None:
        torch.testing.assert_close(out.response_hidden, torch.cat(kept), atol=1e-4, rtol=1e-4,
                                   msg=f"{where} kept hidden states")


def test_multiturn_reference_tp1(model, reference):
    hf = model[0]
    greedy = reference[("dynamic", "greedy")]
    # The script exercises what it should: several turns, observations, EOS, max_turns.
    assert int(greedy.num_turns.max()) == 3 and int(greedy.num_turns.min()) >= 1
    assert int(greedy.observation_mask.sum()) > 0
    assert greedy.stats["env_calls"] > 0 and greedy.stats["num_extensions"] > 0
    _check_teacher_vs_hf(hf, greedy, reference.pop("teacher_hidden"), "tp1")
    for (engine, name), out in reference.items():
        _check_transcript(out, f"tp1 {engine} {name}")
        if name == "greedy":
            assert out.response_hidden is not None
            _check_greedy_vs_hf(hf, out, f"tp1 {engine}")
    for key in (("static", "greedy"), ("nocache", "greedy")):
        assert torch.equal(reference[key].token_ids, greedy.token_ids), key
    sampled = reference[("dynamic", "sampled")]
    for engine in ("dynamic", "static"):  # --check-logprobs holds across turns
        gap = reference[(engine, "sampled")].logprob_gap
        assert gap["tokens"] == int(sampled.response_mask.sum()) and gap["max"] <= 1e-5, (engine, gap)
    assert reference[("dynamic_cap3", "sampled")].stats["capacity_rows"] == 3
    for key in (("static", "sampled"), ("dynamic_cap3", "sampled")):
        assert torch.equal(reference[key].token_ids, sampled.token_ids), key
        assert torch.equal(reference[key].response_mask, sampled.response_mask), key
    torch.testing.assert_close(reference[("static", "sampled")].logprobs, sampled.logprobs,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vpp2"])
def test_multiturn_layouts_match_tp1(layout, model, reference):
    hf, arch, full = model
    tp, pp, vpp = LAYOUTS[layout]
    for rank, res in enumerate(run_distributed(_generate, tp * pp, args=(full, arch, tp, pp, vpp))):
        hidden = res.pop("teacher_hidden")
        if hidden is not None:  # the last pipeline stage
            _check_teacher_vs_hf(hf, res[("dynamic", "greedy")], hidden, f"{layout} rank {rank}")
        for (engine, name), out in res.items():
            where = f"{layout} rank {rank} {engine} {name}"
            base = reference[(engine, name)]  # this engine at TP1
            assert torch.equal(out.token_ids, base.token_ids), where
            assert torch.equal(out.response_mask, base.response_mask), where
            assert torch.equal(out.num_turns, base.num_turns), where
            torch.testing.assert_close(out.logprobs, base.logprobs, atol=1e-4, rtol=0, msg=where)
            if engine != "dynamic_cap3" and name == "sampled":  # --check-logprobs, this layout
                gap = out.logprob_gap
                assert gap["tokens"] == int(out.response_mask.sum()) and gap["max"] <= 1e-5, (where, gap)
            if name == "greedy" and (rank == 0 or out.response_hidden is not None):
                _check_greedy_vs_hf(hf, out, where)

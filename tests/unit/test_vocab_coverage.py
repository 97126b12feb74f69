"""Vocabulary coverage (issue 21): a tokenizer smaller than the model's true vocabulary.

- the sampler never draws an id >= `GenerationConfig.vocab_limit` (greedy: the argmax of
  the plain training forward's logits over the allowed ids, position by position; sampled:
  every id below the limit, and the engine's log-probs equal the training forward's under
  the same limit), both engines;
- decoding an id the tokenizer has no piece for is one ValueError naming the id, for
  HF (which would drop it silently), SentencePiece (IndexError) and the char tokenizer;
- preflight refuses a tokenizer larger than the models' true vocabulary (naming the
  padded size too) and accepts a smaller one.
"""
import pytest
import torch

from tip_megatron.rollout.generate import GenerationConfig
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch

PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [100, 200, 30]]
LIMIT = 40  # of the tiny model's 250 ids


def _generate(arch):
    from tip_megatron.models import build_model
    from tip_megatron.rollout.consistency import _training_forward
    from tip_megatron.rollout.generate import generate
    from tip_megatron.runtime import parallel

    g = parallel.initialize(parallel.ParallelLayout(1, 1), seed=7)
    chunks = build_model(arch, g)
    out = {}
    for engine in ("dynamic", "static"):
        for name, kw in {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.5, n=4),
                         "unlimited": dict(temperature=1.5, n=4, vocab_limit=0)}.items():
            config = GenerationConfig(**{"max_new_tokens": 16, "pad_id": 0, "vocab_limit": LIMIT,
                                         "engine": engine, "check_logprobs": True, **kw})
            rollouts = generate(chunks, g, arch, PROMPTS, config, 1, 0)
            with torch.no_grad():
                logits = _training_forward(chunks, g, arch, rollouts.token_ids)
            out[engine, name] = (rollouts, logits.float())
    return out


@pytest.fixture(scope="module")
def results():
    # spawn, not fork: forked after the rest of the unit tier in one pytest process, this
    # rank hung in megatron's group set-up (a gloo group's destructor joining its threads;
    # see the session note): a fresh interpreter does not inherit that process's state.
    return run_distributed(_generate, 1, args=(tiny_arch("llama"),), start_method="spawn")[0]


def _responses(rollouts):
    return [rollouts.response(r) for r in range(rollouts.num_rows)]


@pytest.mark.parametrize("engine", ["dynamic", "static"])
def test_no_sampled_id_reaches_beyond_the_limit(results, engine):
    ids = [i for ids in _responses(results[engine, "sampled"][0]) for i in ids]
    assert len(ids) >= 40 and max(ids) < LIMIT
    unlimited = [i for ids in _responses(results[engine, "unlimited"][0]) for i in ids]
    assert max(unlimited) >= LIMIT, "without the limit this model draws ids beyond it (the test can fail)"


@pytest.mark.parametrize("engine", ["dynamic", "static"])
def test_greedy_is_the_argmax_over_the_allowed_ids(results, engine):
    rollouts, logits = results[engine, "greedy"]
    mask = rollouts.response_mask[:, 1:]
    predicted = logits[:, :-1, :LIMIT].argmax(-1)  # token j+1 is predicted at position j
    assert torch.equal(rollouts.token_ids[:, 1:][mask], predicted[mask])
    full = logits[:, :-1].argmax(-1)[mask]
    assert (full >= LIMIT).any(), "the unrestricted argmax differs somewhere (the test can fail)"


@pytest.mark.parametrize("engine", ["dynamic", "static"])
def test_logprobs_agree_under_the_limit(results, engine):
    gap = results[engine, "sampled"][0].logprob_gap
    assert gap["tokens"] > 0 and gap["max"] < 1e-4, gap


def test_sample_vocab():
    assert GenerationConfig(vocab_limit=0).sample_vocab(250) == 250
    assert GenerationConfig(vocab_limit=40).sample_vocab(250) == 40
    assert GenerationConfig(vocab_limit=300).sample_vocab(250) == 250
    with pytest.raises(ValueError, match=r"vocab_limit=-1: must be an integer >= 0"):
        GenerationConfig(vocab_limit=-1)


# ------------------------------------------------------------------ decoding
def test_char_tokenizer_names_the_id():
    from tip_megatron.data.tokenizers import CharTokenizer

    with pytest.raises(ValueError, match=r"id 14 outside \[0, 14\)"):
        CharTokenizer().decode([1, 14])


def test_sentencepiece_names_the_id(tmp_path):
    pytest.importorskip("sentencepiece")
    from tip_megatron.data.tokenizers import load_tokenizer
    from tip_megatron.testing.assets import char_spm_model

    char_spm_model(tmp_path / "t.model", "0123456789+=")
    tok = load_tokenizer(tmp_path / "t.model")
    assert tok.decode(tok.encode("12+3")) == "12+3"
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} outside \[0, {tok.vocab_size}\): no piece"):
        tok.decode([*tok.encode("12"), tok.vocab_size])


def test_hf_tokenizer_does_not_drop_an_id(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tip_megatron.data.tokenizers import load_tokenizer
    from tip_megatron.testing.assets import bpe_tokenizer

    bpe_tokenizer(tmp_path, ["hello world"] * 10)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hello")
    assert tok.hf.decode(ids + [tok.vocab_size]) == tok.hf.decode(ids), "HF drops it silently"
    with pytest.raises(ValueError, match=rf"id {tok.vocab_size} outside \[0, {tok.vocab_size}\)"):
        tok.decode(ids + [tok.vocab_size])


# ------------------------------------------------------------------ preflight
def test_preflight_compares_the_tokenizer_with_the_true_and_padded_vocabulary(caplog):
    from tip_megatron.runtime.errors import PreflightError
    from tip_megatron.train.preflight_tokenizer import check_vocab_coverage

    with pytest.raises(PreflightError, match=r"^data.tokenizer: the tokenizer has 151937 ids but the "
                       r"models' true vocabulary is 151936 \(padded to 152064 rows at tp=2"):
        check_vocab_coverage(151937, 151936, 2)
    check_vocab_coverage(151936, 151936, 2)
    with caplog.at_level("INFO", logger="tip_megatron.train.preflight_tokenizer"):
        check_vocab_coverage(151669, 151936, 2)  # Qwen3: fewer tokens than rows
    assert "ids >= 151669 are never sampled" in caplog.text

"""Tokenizers built locally in the test (no downloads): HF dir, SentencePiece, characters."""
import io
import json
import shutil

import pytest

from tip_megatron.data.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    fallback_chat_text,
    load_tokenizer,
)

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, what is 12+34?",
          "sentencepiece and byte level bpe tokenizers"] * 10
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


def build_hf_dir(directory, *, vocab_size=300, chat_template=CHATML, extra_corpus=()):
    """A Qwen-style byte-level BPE tokenizer saved as an HF directory."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CORPUS + list(extra_corpus), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=chat_template)
    hf.save_pretrained(str(directory))
    return directory


def train_sp(path, *, vocab_size=60, text=CORPUS):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf,
                                   vocab_size=vocab_size, model_type="bpe", pad_id=3,
                                   minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sp(tmp_path_factory.mktemp("sp") / "tok.model")


def test_hf_round_trip_and_special_ids(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    text = "hello world, the lazy fox"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]
    assert tok.vocab_size == len(tok.hf) == max(tok.hf.get_vocab().values()) + 1
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == tok.hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_id is None and tok.stop_ids == (tok.eos_id,)
    assert tok.decode([*ids, tok.eos_id], skip_special_tokens=True) == text


def test_hf_chat_template_matches_transformers(hf_dir):
    tok = load_tokenizer(hf_dir)
    ids = tok.apply_chat_template(MESSAGES)
    rendered = tok.hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tok.hf.encode(rendered, add_special_tokens=False)
    assert tok.decode(ids) == rendered


def test_hf_generation_config_adds_stop_ids(tmp_path, hf_dir):
    d = tmp_path / "tok"
    shutil.copytree(hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    tok = load_tokenizer(d)
    assert tok.stop_ids[0] == tok.eos_id and set(tok.stop_ids) == {tok.eos_id, 1, 2}


def test_hf_without_template_needs_opt_in_fallback(tmp_path):
    d = build_hf_dir(tmp_path / "plain", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(d).apply_chat_template(MESSAGES)
    tok = load_tokenizer(d, chat_fallback=True)
    assert tok.apply_chat_template(MESSAGES) == tok.encode(fallback_chat_text(MESSAGES),
                                                           add_special_tokens=True)


def test_hf_fingerprint_same_vocab_equal_different_vocab_not(tmp_path, hf_dir):
    same = load_tokenizer(build_hf_dir(tmp_path / "same"))
    assert same.fingerprint() == load_tokenizer(hf_dir).fingerprint()
    smaller = load_tokenizer(build_hf_dir(tmp_path / "small", vocab_size=280))
    assert smaller.fingerprint() != same.fingerprint()
    other = load_tokenizer(build_hf_dir(tmp_path / "other", extra_corpus=["zebra zebra"] * 50))
    assert other.fingerprint() != same.fingerprint()


def test_sentencepiece_round_trip(sp_path):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    ids = tok.encode("hello world fox")
    assert tok.decode(ids) == "hello world fox"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 60)
    assert tok.encode("hello", add_special_tokens=True) == [1, *tok.encode("hello")]
    assert tok.decode([1, *ids, 2, 3], skip_special_tokens=True) == "hello world fox"


def test_sentencepiece_chat_and_directory_layout(tmp_path, sp_path):
    with pytest.raises(ValueError, match="chat_fallback=True"):
        load_tokenizer(sp_path).apply_chat_template(MESSAGES)
    tok = load_tokenizer(sp_path, chat_fallback=True)
    ids = tok.apply_chat_template(MESSAGES)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode(fallback_chat_text(MESSAGES))
    (tmp_path / "d").mkdir()
    shutil.copy(sp_path, tmp_path / "d" / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path / "d"), SentencePieceTokenizer)


def test_sentencepiece_fingerprint(tmp_path, sp_path):
    copy = tmp_path / "copy.model"
    shutil.copy(sp_path, copy)
    assert load_tokenizer(copy).fingerprint() == load_tokenizer(sp_path).fingerprint()
    other = train_sp(tmp_path / "other.model", text=["zebra crossing yak"] * 30 + CORPUS)
    assert load_tokenizer(other).fingerprint() != load_tokenizer(sp_path).fingerprint()


def test_char_tokenizer_documented_ids():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("12+34=46") == [1, 2, 10, 3, 4, 11, 4, 6]
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (12, 13, None, 14)
    assert tok.decode([*tok.encode("7+8=15"), 12, 13]) == "7+8=15<eos><pad>"
    assert tok.decode([*tok.encode("7+8=15"), 12, 13], skip_special_tokens=True) == "7+8=15"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x2")
    with pytest.raises(ValueError, match="no chat format"):
        tok.apply_chat_template(MESSAGES)
    assert tok.fingerprint() == CharTokenizer().fingerprint()
    assert tok.fingerprint() != CharTokenizer("0123456789+-=").fingerprint()


def test_load_tokenizer_errors_name_path_and_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*accepted"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="junk.*weights.bin.*accepted"):
        load_tokenizer(tmp_path / "junk")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt.*accepted"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "badhf").mkdir()
    (tmp_path / "badhf" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="badhf"):
        load_tokenizer(tmp_path / "badhf")


THINK_TEMPLATE = (CHATML + "{% if enable_thinking is defined and not enable_thinking %}"
                  "<think>\n\n</think>\n\n{% endif %}")


def test_chat_template_kwargs_and_system_prompt_reach_the_template(tmp_path):
    """data.chat_template_kwargs / --chat-template-kwargs reach the template's variables
    (Qwen3's enable_thinking), and a system prompt is put first where a row has none; the
    reference is transformers' own rendering of the same conversation."""
    from tip_megatron.data.prompts import PromptDataset

    d = build_hf_dir(tmp_path / "think", chat_template=THINK_TEMPLATE)
    tok = load_tokenizer(d)
    rows = [{"prompt": "hello world"}, {"messages": MESSAGES}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = PromptDataset(tmp_path / "p.jsonl", tok, apply_chat_template=True)
    ds = PromptDataset(tmp_path / "p.jsonl", tok, apply_chat_template=True,
                       chat_template_kwargs={"enable_thinking": False}, system_prompt="reason")

    def reference(messages, **kw):
        text = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return tok.encode(text)

    user = [{"role": "user", "content": "hello world"}]
    assert plain.token_ids(0) == reference(user)
    assert ds.token_ids(0) == reference([{"role": "system", "content": "reason"}, *user],
                                        enable_thinking=False)
    assert ds.token_ids(1) == reference(MESSAGES, enable_thinking=False)  # its own system kept
    assert "<think>" in tok.decode(ds.token_ids(1)) and "<think>" not in tok.decode(plain.token_ids(1))
    assert tok.apply_chat_template(MESSAGES, enable_thinking=False) == ds.token_ids(1)

"""`tip-megatron generate` end to end: HF model + tokenizer -> `convert hf-to-mcore` ->
generate from a JSONL prompt file, as one process, under a torchrun-like TP=2 world, and
as two DP replicas. Greedy output equals transformers' greedy `generate` on the same
weights and the same tokenized prompts.
"""
import json

import pytest
import torch

from tip_megatron.testing.assets import cli_main, imported_hf_model, write_jsonl
from tip_megatron.testing.distributed import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, what is 12+34?",
          "sentencepiece and byte level bpe tokenizers"] * 10
ROWS = [{"prompt": "hello world", "answer": "42"}, {"prompt": "the quick brown fox jumps over"},
        {"id": "q3", "prompt": "what is"}]
NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tip_megatron.data.tokenizers import load_tokenizer

    work = tmp_path_factory.mktemp("generate_cli")
    hf = imported_hf_model(work / "hf", work / "ckpt", seed=3, corpus=CORPUS)
    write_jsonl(work / "prompts.jsonl", ROWS)
    tok = load_tokenizer(work / "ckpt" / "tokenizer")
    expected = []
    assert tok.vocab_size < hf.config.vocab_size  # the case the suppression below covers
    with torch.no_grad():
        for row in ROWS:
            ids = tok.encode(row["prompt"], add_special_tokens=True)
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, eos_token_id=list(tok.stop_ids),
                              pad_token_id=tok.pad_id,
                              # the engine never samples an id the tokenizer cannot decode (the
                              # model's 300 rows, the tokenizer's 280 ids: docs/data.md)
                              suppress_tokens=list(range(tok.vocab_size, hf.config.vocab_size)),
                              )[0, len(ids):].tolist()
            stop = [i for i, t in enumerate(out) if t in tok.stop_ids]
            expected.append(out[:stop[0] + 1] if stop else out)
    return work, expected


def _run(work, world, name, *extra):
    argv = ["generate", "--ckpt", str(work / "ckpt"), "--prompts", str(work / "prompts.jsonl"),
            "--out", str(work / name), "--max-new-tokens", str(NEW), "--batch-size", "2", *extra]
    assert run_distributed(cli_main, world, args=(argv,)) == [0] * world
    return [json.loads(line) for line in (work / name).read_text().splitlines()]


def test_greedy_matches_transformers_one_process_and_dp2(setup):
    work, expected = setup
    one = _run(work, 1, "greedy.jsonl", "--greedy")
    assert [line["token_ids"] for line in one] == expected
    assert [line["prompt_id"] for line in one] == ["prompts.jsonl:1", "prompts.jsonl:2", "q3"]
    assert [line["sample_index"] for line in one] == [0, 0, 0]
    assert one[0]["answer"] == "42" and "answer" not in one[1]
    for line in one:
        assert line["finish_reason"] == ("stop" if len(line["token_ids"]) < NEW else "length")
    dp2 = _run(work, 2, "greedy_dp2.jsonl", "--greedy")
    assert dp2 == one


def test_sampled_under_tp2(setup):
    from tip_megatron.data.tokenizers import load_tokenizer

    work, _ = setup
    lines = _run(work, 2, "sampled.jsonl", "--tp", "2", "--n", "2", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "5")
    assert [(line["prompt_index"], line["sample_index"]) for line in lines] == [
        (p, s) for p in range(len(ROWS)) for s in range(2)]
    tok = load_tokenizer(work / "ckpt" / "tokenizer")
    for line in lines:
        assert 1 <= len(line["token_ids"]) <= NEW
        assert line["text"] == tok.decode(line["token_ids"], skip_special_tokens=True)
    assert lines[0]["token_ids"] != lines[1]["token_ids"]

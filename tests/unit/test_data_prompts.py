"""PromptDataset: formats, fields, chat templates, overlong policies, errors."""
import json
import string

import pytest

from tip_megatron.data.prompts import PromptDataset, PromptFields, PromptRecord
from tip_megatron.data.tokenizers import CharTokenizer


class ChatCharTokenizer(CharTokenizer):
    """Characters, with a recognisable chat format: `<role>:content|` ... `a:`."""

    def __init__(self):
        super().__init__(string.ascii_lowercase + string.digits + " +=?:|")

    def apply_chat_template(self, messages):
        text = "".join(f"{m['role'][0]}:{m['content']}|" for m in messages) + "a:"
        return self.encode(text)


TOK = ChatCharTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_prompt_field_answer_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "1+1=", "answer": "2", "id": "q0"},
        "",  # blank lines are skipped
        {"prompt": "what is 3", "answer": 3},
        {"prompt": "no answer"},
    ])
    ds = PromptDataset(path, TOK)
    assert len(ds) == 3 and ds.stats["num_rows"] == 3
    assert ds[0] == PromptRecord("q0", TOK.encode("1+1="), "2", "1+1=", None)
    assert ds[1].prompt_id == "p.jsonl:3" and ds[1].answer == "3"
    assert ds[2].answer is None and ds.token_ids(2) == TOK.encode("no answer")
    assert ds.lengths.tolist() == [4, 9, 9]


def test_jsonl_messages_use_chat_template(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2=?"},
                {"role": "assistant", "content": "4"}]  # trailing reply is dropped
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages, "answer": "4"}])
    rec = PromptDataset(path, TOK)[0]
    assert rec.token_ids == TOK.encode("s:be brief|u:2+2=?|a:")
    assert rec.text == "2+2=?" and rec.messages == messages[:2] and rec.answer == "4"
    ds = PromptDataset(path, TOK)
    assert ds.stats["num_assistant_turns_dropped"] == 1


def test_plain_prompt_with_apply_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+2", "sol": "3"}])
    fields = PromptFields(prompt="question", answer="sol")
    rec = PromptDataset(path, TOK, fields=fields, apply_chat_template=True)[0]
    assert rec.token_ids == TOK.encode("u:1+2|a:") and rec.answer == "3"


def test_parquet_prompts_and_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "prompt": ["1+1=", None, "5+5="],
        "messages": [None, [{"role": "user", "content": "7+1=?"}], None],
        "answer": ["2", "8", None],
    })
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    ds = PromptDataset(tmp_path / "p.parquet", TOK)
    recs = ds.records([2, 0, 1])  # rows from both row groups, out of order
    assert [r.prompt_id for r in recs] == ["p.parquet:3", "p.parquet:1", "p.parquet:2"]
    assert [r.answer for r in recs] == [None, "2", "8"]
    assert recs[0].token_ids == TOK.encode("5+5=")
    assert recs[2].token_ids == TOK.encode("u:7+1=?|a:") and recs[2].text == "7+1=?"


def test_parquet_missing_column_and_bad_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="a.parquet.*no 'prompt' or 'messages' column"):
        PromptDataset(tmp_path / "a.parquet", TOK)
    pq.write_table(pa.table({"prompt": ["ok", None]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="b.parquet, row 2"):
        PromptDataset(tmp_path / "b.parquet", TOK)


def test_overlong_truncate_left_and_skip_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "123456"}, {"prompt": "12"},
                                             {"prompt": "abcdefgh"}])
    ds = PromptDataset(path, TOK, max_prompt_len=4, overlong="truncate_left")
    assert [ds.token_ids(i) for i in range(3)] == [TOK.encode(s) for s in ("3456", "12", "efgh")]
    assert ds.stats | {} == {"num_rows": 3, "num_kept": 3, "num_truncated": 2, "num_skipped": 0,
                             "num_tokens": 10, "max_prompt_tokens": 8,
                             "num_assistant_turns_dropped": 0}
    ds = PromptDataset(path, TOK, max_prompt_len=4, overlong="skip")
    assert len(ds) == 1 and ds[0].prompt_id == "p.jsonl:2"
    assert (ds.stats["num_skipped"], ds.stats["num_truncated"]) == (2, 0)
    with pytest.raises(ValueError, match="no prompts left.*overlong='skip' dropped every prompt.*max_prompt_len"):
        PromptDataset(path, TOK, max_prompt_len=1, overlong="skip")
    with pytest.raises(ValueError, match="overlong='drop'.*truncate_left"):
        PromptDataset(path, TOK, max_prompt_len=1, overlong="drop")


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "1+1=",', "invalid JSON"),
    ('["1+1="]', "expected a JSON object"),
    ('{"text": "1+1="}', "no 'prompt' or 'messages' field"),
    ('{"prompt": 12}', "'prompt' must be a string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object"),
    ('{"messages": []}', "non-empty list"),
    ('{"prompt": "1", "answer": [1]}', "'answer' must be a string or number"),
    ('{"prompt": "1+X"}', "'X' not in its vocabulary"),
    ('{"prompt": ""}', "no tokens"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1="}, "", line])
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 3: .*{match}"):
        PromptDataset(path, TOK)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(tmp_path / "nope.jsonl", TOK)
    (tmp_path / "p.csv").write_text("prompt\n1\n")
    with pytest.raises(ValueError, match="p.csv.*accepted"):
        PromptDataset(tmp_path / "p.csv", TOK)
    write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match=r"no prompts in .*empty.jsonl: the file\(s\) hold no rows") as err:
        PromptDataset(tmp_path / "empty.jsonl", TOK)
    assert "overlong" not in str(err.value)  # nothing was dropped: the hint would mislead


def test_multiple_files_and_file_change_detected(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1"}, {"prompt": "2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "3"}])
    ds = PromptDataset([a, b], TOK)
    assert [r.text for r in ds.records([2, 0, 1])] == ["3", "1", "2"]
    with pytest.raises(IndexError):
        ds[3]
    write_jsonl(b, [{"prompt": "33"}])
    with pytest.raises(RuntimeError, match="b.jsonl changed"):
        ds.records([2])


def test_hf_tokenizer_chat_dataset(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tip_megatron.data.tokenizers import load_tokenizer

    words = ["<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world", "\n", "[UNK]"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    raw.add_special_tokens(words[:2])
    from transformers import PreTrainedTokenizerFast

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                            chat_template=template).save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}])
    rec = PromptDataset(path, tok)[0]
    assert rec.token_ids == [0, 2, 6, 4, 1, 0, 3, 6]


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    import sys

    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises
    with pytest.raises(ImportError, match="pip install pyarrow"):
        PromptDataset(tmp_path / "p.parquet", TOK)

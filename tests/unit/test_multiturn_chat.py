"""Chat formats of multi-turn rollouts: records with `messages` and `tools` render through
the chat template (tools included), and tool results come back through the template's
tool role: prompt + the model's turn + the observation ids decode to exactly what the
template renders for the whole conversation [messages, assistant(turn), tool(result)]
with the generation prompt, i.e. what a served model would see (HF transformers'
`apply_chat_template` is the reference)."""
import json

import pytest

from tip_megatron.data.prompts import PromptDataset
from tip_megatron.data.tokenizers import CharTokenizer, load_tokenizer
from tip_megatron.rollout.env import Episodes, Observation, Turn
from tip_megatron.testing.assets import bpe_tokenizer, write_jsonl

pytest.importorskip("transformers")

# A Qwen3-like template: tool schemas in a system block, tool results in a user turn.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "b": "int"}}}]
MESSAGES = [{"role": "user", "content": "What is 2+3? Use the tool."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe_tokenizer(path, ["What is 2+3? Use the tool.", "<tool_call>add(2, 3)</tool_call>",
                         "<tool_response>5</tool_response>", json.dumps(TOOLS)] * 20)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(path)


def test_records_with_tools_render_through_the_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": MESSAGES, "tools": TOOLS, "answer": "5"},
                                             {"messages": MESSAGES}])
    ds = PromptDataset(path, tokenizer)
    hf = tokenizer.hf
    with_tools = hf.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ds.token_ids(0) == tokenizer.encode(with_tools) and '"name": "add"' in with_tools
    assert ds.token_ids(1) == tokenizer.encode(hf.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False))
    assert ds[0].tools == TOOLS and ds[1].tools is None


def test_bad_tools_field_names_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": MESSAGES, "tools": "add"}])
    with pytest.raises(ValueError, match=r"p\.jsonl, line 1: field 'tools' must be a list of tool schema"):
        PromptDataset(path, tokenizer)


def test_tool_result_is_what_the_template_renders_for_the_conversation(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": MESSAGES, "tools": TOOLS}])
    record = PromptDataset(path, tokenizer)[0]
    episodes = Episodes([record], tokenizer, observation_format="tool")
    turn_text = "<tool_call>add(2, 3)</tool_call>"
    turn_ids = tokenizer.encode(turn_text)
    obs = episodes._observation(Observation("5"))
    assert isinstance(obs, list) and obs
    served = tokenizer.hf.apply_chat_template(
        MESSAGES + [{"role": "assistant", "content": turn_text}, {"role": "tool", "content": "5"}],
        tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(record.token_ids + turn_ids + obs) == served
    # The plain format appends the text as tokenized.
    assert Episodes([record], tokenizer)._observation("5") == tokenizer.encode("5")


def test_tool_format_without_a_template_is_refused():
    episodes = Episodes([object()], CharTokenizer(), observation_format="tool", env_path="a.b:C")
    with pytest.raises(ValueError, match="rollout.observation_format=tool: tokenizer char:.* has no chat template"):
        episodes.build()
    assert Turn(0, (1,), "x").index == 0

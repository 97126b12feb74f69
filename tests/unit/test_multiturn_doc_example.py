"""The environment example of docs/multiturn.md runs as written and follows the protocol."""
import re
import sys
import types
from pathlib import Path

from tip_megatron.data.sources import PromptRecord
from tip_megatron.rollout.env import Episodes, Observation, Turn
from tip_megatron.testing.envs import IdTokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "multiturn.md"


def _example_module():
    text = DOC.read_text()
    block = re.search(r"## The protocol \(complete example\)\n\n```python\n(.*?)```", text, re.S)[1]
    module = types.ModuleType("doc_example")
    exec(compile(block, str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own doc
    return module


def test_doc_example_environment():
    calc = _example_module().Calculator(PromptRecord("q0", [1], None, "x"), precision=2)
    assert calc.step(Turn(0, (1, 2), "let me <call>3.5*2</call>")) == Observation("<result>7.0</result>")
    assert calc.step(Turn(1, (3,), "<call>1+2.25</call>")) == Observation("<result>3.25</result>")
    assert calc.step(Turn(2, (4,), "<call>a*b</call>")) == Observation("<result>error</result>")


def test_doc_example_through_episodes():
    """Built and called the way the engine does (one rank: no broadcast)."""
    module = _example_module()
    sys.modules["doc_example"] = module
    try:
        episodes = Episodes([PromptRecord("q0", [1], None, "x")], _TextTokenizer(),
                            env_path="doc_example:Calculator", env_args={"precision": 1}, n=2)
        episodes.build()
        answers = episodes.step([0, 1], [Turn(0, (1,), "<call>2*3</call>"), Turn(0, (1,), "<call>1+1</call>")])
        assert answers == [list(b"<result>6.0</result>"), list(b"<result>2.0</result>")]
    finally:
        del sys.modules["doc_example"]


class _TextTokenizer(IdTokenizer):
    """Bytes as ids (the example's observations are plain text)."""

    def __init__(self):
        super().__init__(256)

    def encode(self, text, **_):
        return list(text.encode())

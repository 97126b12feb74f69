"""Scripted environments and a transparent tokenizer for multi-turn tests.

`IdTokenizer` writes id i as the text `<i>` (and reads it back), so a turn-stop string can
name a set of ids, and any id a random model samples decodes. `ScriptedEnv` answers each
turn with observation ids that depend only on (prompt, turn index, the turn's ids): a
test can replay it over a finished transcript and check what the engine appended.
"""
from __future__ import annotations

import re
import time
from typing import Any, Sequence

from tip_megatron.rollout.env import Observation, Turn


class IdTokenizer:
    """`<i>` per id; `encode` of anything else raises."""

    def __init__(self, vocab_size: int, stop_ids: Sequence[int] = (), pad_id: int = 0):
        self.vocab_size, self.stop_ids, self.pad_id = vocab_size, tuple(stop_ids), pad_id

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def encode(self, text: str, **_: Any) -> list[int]:
        ids = [int(m) for m in re.findall(r"<(\d+)>", text)]
        if self.decode(ids) != text:
            raise ValueError(f"IdTokenizer cannot encode {text!r}")
        return ids


def scripted_observation(prompt_key: int, turn: Turn) -> list[int]:
    """The observation ids of `ScriptedEnv`: 1 to 4 ids in [20, 220)."""
    h = (sum(turn.token_ids) * 31 + prompt_key * 7 + turn.index * 13) % 9973
    return [20 + (h * (k + 3)) % 200 for k in range(1 + h % 4)]


class ScriptedEnv:
    """Deterministic: observation `scripted_observation(record.prompt_id, turn)`; the
    rollout ends after turn `end_after` (0-based) when the prompt key is odd. Faults and
    edge cases on demand (`fault`: raise | hang | nontext | huge | none (returns None) |
    empty (an empty observation, the rollout goes on)) at turn `fault_turn`."""

    def __init__(self, record: Any, end_after: int = 1, fault: str = "", fault_turn: int = 0):
        self.key = int(getattr(record, "prompt_id", record))
        self.end_after, self.fault, self.fault_turn = end_after, fault, fault_turn

    def step(self, turn: Turn):
        if self.fault and turn.index == self.fault_turn:
            if self.fault == "raise":
                raise RuntimeError("tool crashed")
            if self.fault == "hang":
                time.sleep(3600)
            if self.fault == "nontext":
                return Observation(text=[1, 2, 3])  # type: ignore[arg-type]
            if self.fault == "huge":
                return "<21>" * 10_000
            if self.fault == "none":
                return None
            if self.fault == "empty":
                return ""
        ids = scripted_observation(self.key, turn)
        text = "".join(f"<{i}>" for i in ids)
        return Observation(text, done=self.key % 2 == 1 and turn.index >= self.end_after)


class DigitEnv:
    """For the character tokenizer (`0123456789+=`): turn k is answered with the prompt's
    answer digits rotated by k (so the observation depends on the record and the turn);
    the rollout ends after turn `end_after` when the answer is odd."""

    def __init__(self, record: Any, end_after: int = 1, fault: str = ""):
        self.answer, self.end_after, self.fault = str(record.answer or "0"), end_after, fault

    def step(self, turn: Turn) -> Observation:
        if self.fault == "raise":
            raise RuntimeError("tool crashed")
        k = turn.index % len(self.answer)
        return Observation(self.answer[k:] + self.answer[:k],
                           done=int(self.answer) % 2 == 1 and turn.index >= self.end_after)

"""Turn bookkeeping of multi-turn rollouts, shared by both engines (rollout/env.py has the
environment protocol; docs/multiturn.md the contract).

Shapes: python lists indexed by row (rows = prompts * n); no tensors.

    tracker = TurnTracker(episodes, config, rows)
    ended = tracker.generated(rows, ids, done)      # after each sampled token
    for row, ids, ends in tracker.observe(ended, spans):   # collective: env answers
        ...                                          # the engine appends `ids` as context

Every rank of the model-parallel group runs the same bookkeeping on the same ids (the
sampled ids are broadcast by the engines), so all take the same decisions; the
environment answers come from one rank (`Episodes.step`).
"""
from __future__ import annotations

import time
from typing import Sequence

from tip_megatron.rollout.env import Episodes, Turn


class TurnTracker:
    def __init__(self, episodes: Episodes, config, rows: int):
        self.episodes = episodes
        self.stops = tuple(config.turn_stop)
        self.max_turns, self.budget = config.max_turns, config.max_new_tokens
        # A stop string spans at most this many tokens (a token decodes to >= 1 byte, a
        # string of b bytes, so b tokens; +1 for a token that completes it and carries more).
        self.tail = 1 + max(len(s.encode("utf-8")) for s in self.stops)
        self.current: list[list[int]] = [[] for _ in range(rows)]
        self.turn = [0] * rows
        """Index of each row's current (or last) turn."""
        self.stats = dict(env_calls=0, env_s=0.0, observation_tokens=0, truncated_observations=0)

    def num_turns(self) -> list[int]:
        """Turns each row generated (a turn with no token yet does not count)."""
        return [t + bool(cur) for t, cur in zip(self.turn, self.current)]

    def generated(self, rows: Sequence[int], ids: Sequence[int], done: Sequence[bool]) -> tuple[list, list]:
        """Append each row's newest id to its turn. Returns (rows whose turn ended with a
        `turn_stop` and who go to the environment, rows that ended one at `max_turns`:
        the rollout ends there). Rows already `done` (EOS, budget) only append."""
        to_env, finished = [], []
        for row, token, over in zip(rows, ids, done):
            turn = self.current[row]
            turn.append(int(token))
            if over or not self._ends_turn(turn):
                continue
            (finished if self.turn[row] + 1 >= self.max_turns else to_env).append(row)
        return to_env, finished

    def _ends_turn(self, turn: list[int]) -> bool:
        """A stop string appears in the text once the newest token is added (and not before:
        it was not complete a token earlier)."""
        decode = self.episodes.decode
        now = decode(turn[-self.tail:])
        if not any(s in now for s in self.stops):
            return False
        before = decode(turn[-self.tail:-1])
        return any(s in now and s not in before for s in self.stops)

    def observe(self, rows: list[int], spans: Sequence[int]) -> list[tuple[int, list[int], bool]]:
        """The environments' answers to the turns of `rows` (collective over the model-
        parallel group): (row, observation ids cut to the budget, whether the rollout
        ends after them). `spans[k]`: tokens after the prompt that row k holds now."""
        if not rows:
            return []
        turns = [Turn(self.turn[r], tuple(self.current[r]), self.episodes.decode(self.current[r]))
                 for r in rows]
        begin = time.perf_counter()
        answers = self.episodes.step(rows, turns)
        self.stats["env_s"] += time.perf_counter() - begin
        self.stats["env_calls"] += len(rows)
        out = []
        for row, span, answer in zip(rows, spans, answers):
            self.turn[row] += 1
            self.current[row] = []
            ends = answer is None or isinstance(answer, tuple)
            ids = [] if answer is None else (answer[1] if isinstance(answer, tuple) else answer)
            room = self.budget - int(span)
            if len(ids) >= room:  # documented truncation: cut to the budget, the rollout ends
                self.stats["truncated_observations"] += int(len(ids) > room)
                ids, ends = ids[:room], True
            self.stats["observation_tokens"] += len(ids)
            out.append((row, list(ids), ends))
        return out

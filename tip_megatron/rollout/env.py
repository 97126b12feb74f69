"""Environments of multi-turn rollouts: the protocol, loading one, calling it safely.

Shapes: none ([rows] python lists of token ids); observation ids travel as one int64
tensor over the model-parallel group.

    # my_pkg/calc.py                           # run config:
    class Calculator:                          #   rollout.env: my_pkg.calc:Calculator
        def __init__(self, record, scale=1):   #   rollout.env_args: {scale: 2}
            self.record, self.scale = record, scale
        def step(self, turn: Turn) -> Observation:
            return Observation(text=f"<result>{eval_call(turn.text)}</result>")

One environment per rollout (row), built from the rollout's prompt record by
`Factory(record, **env_args)`. The engine generates until a turn ends (its text contains a
`rollout.turn_stop` string, e.g. a tool call's closing tag), hands the turn to
`env.step(turn)`, and appends the observation's tokens as context (never trained or
selected); EOS, `rollout.max_turns` or the token budget (`rollout.max_new_tokens`, every
turn and observation together) end the rollout. docs/multiturn.md has the whole contract.

Environments run in the generating process, on ONE rank of each model-parallel group (its
first): the observation ids are broadcast to the others, so every TP/PP rank appends the
same tokens even if an environment is not deterministic, and an environment's side
effects happen once per rollout. All calls of one decode step run at once (one thread
each), each with `rollout.env_timeout_s`.
"""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Turn:
    """What the model generated in one turn."""

    index: int
    """0 for the first turn."""
    token_ids: tuple[int, ...]
    """The turn's generated ids (its stop string's tokens included)."""
    text: str
    """`token_ids` decoded by the run's tokenizer."""


@dataclass(frozen=True)
class Observation:
    """What an environment returns: text the engine tokenizes and appends, and whether
    the rollout ends after it."""

    text: str = ""
    done: bool = False
    """True: the rollout ends (the text, if any, is still appended as context)."""


StepResult = Union[Observation, str, None]
"""`step` may also return a plain str (= Observation(text)) or None (= the rollout ends)."""


class Environment(Protocol):
    def step(self, turn: Turn) -> StepResult: ...


class EnvironmentFailed(ValueError):
    """An environment failed: the message names it, the prompt and the turn (a ValueError:
    the CLI reports it as one line, like other bad input)."""


def load_factory(path: str) -> Callable[..., Environment]:
    """`package.module:Name` -> the callable; ValueError naming `rollout.env` otherwise."""
    module, sep, name = (path or "").partition(":")
    if not sep or not module or not name:
        raise ValueError(f"rollout.env={path!r}: must be an import path 'package.module:Factory'")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rollout.env={path!r}: cannot be imported ({err})") from None
    if not callable(factory):
        raise ValueError(f"rollout.env={path!r}: {type(factory).__name__} is not callable")
    return factory


@dataclass
class Episodes:
    """This call's environments: one per row (rows = len(records) * n, prompt-major).

    Made on every rank of the model-parallel group; only the `source` rank (the group's
    first) constructs and calls environments. Errors name the prompt by its record's
    `where` (file:line)."""

    records: Sequence[Any]
    """One per prompt: what the factory is built from (data.sources.PromptRecord)."""
    tokenizer: Any
    """Decodes turns, encodes observations (the run's tokenizer)."""
    template_kwargs: Optional[dict] = None
    """The chat template's extra variables (data.chat_template_kwargs), for `tool` format."""
    # Set by `generate` from its config and groups:
    observation_format: str = "text"
    env_path: str = ""
    env_args: Optional[dict] = None
    n: int = 1
    timeout_s: float = 30.0
    mp_group: Any = None
    device: Any = None
    """Where the broadcast tensors live (the group's backend: CPU for gloo)."""
    envs: Optional[list] = None

    @property
    def source(self) -> bool:
        return self.mp_group is None or dist.get_world_size(self.mp_group) == 1 \
            or dist.get_rank(self.mp_group) == 0

    def build(self) -> None:
        """Construct the environments (source rank only; a failure reaches every rank)."""
        error: Union[list, str] = []
        if self.source and self.observation_format == "tool":
            try:  # a tokenizer without a usable template fails here, before any rollout
                self.encode("")
            except ValueError as err:
                error = f"rollout.observation_format=tool: {err}"
        if self.source and not error:
            self.envs = []
            try:
                factory = load_factory(self.env_path)
            except ValueError as err:
                error, factory = str(err), None
            for row in range(len(self.records) * self.n if factory else 0):
                try:
                    self.envs.append(factory(self.records[row // self.n], **self.env_args))
                except Exception as err:  # named with the prompt, on every rank
                    error = (f"environment {self.env_path} at {self.where(row)}: building it "
                             f"raised {type(err).__name__}: {err}")
                    break
        self._share(error, 0)

    def where(self, row: int) -> str:
        record = self.records[row // self.n]
        at = getattr(record, "where", "") or getattr(record, "prompt_id", "")
        return f"prompt {at or row // self.n} (row {row})"

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; an id beyond the tokenizer (training samples the model's whole
        true vocabulary, which may be larger) reads as U+FFFD."""
        size = getattr(self.tokenizer, "vocab_size", None)
        if size is None or all(0 <= int(i) < size for i in ids):
            return self.tokenizer.decode(list(ids))
        out, run = [], []
        for i in map(int, ids):
            if 0 <= i < size:
                run.append(i)
                continue
            out += [self.tokenizer.decode(run) if run else "", "\ufffd"]
            run = []
        return "".join(out) + (self.tokenizer.decode(run) if run else "")

    def step(self, rows: list[int], turns: list[Turn]) -> list[Optional[list[int]]]:
        """Observation ids of each row (None: the rollout ends), equal on every rank of
        the model-parallel group (collective when it has several ranks)."""
        payload = self._run(rows, turns) if self.source else None
        return self._share(payload, len(rows))

    def _run(self, rows: list[int], turns: list[Turn]) -> Union[list, str]:
        """Every call at once, one daemon thread each (a hung call cannot be killed; its
        thread is left behind and the run stops with an error)."""
        results: dict[int, Any] = {}

        def call(k: int) -> None:
            try:
                results[k] = ("ok", self.envs[rows[k]].step(turns[k]))
            except BaseException as err:  # reported below with the prompt and turn
                results[k] = ("raised", err)

        threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(len(rows))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout_s  # every call started now: one deadline
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        out = []
        for k, row in enumerate(rows):
            what = f"environment {self.env_path} at {self.where(row)}, turn {turns[k].index}"
            if k not in results:
                return f"{what}: no answer within rollout.env_timeout_s={self.timeout_s:g}"
            status, value = results[k]
            if status == "raised":
                return f"{what} raised {type(value).__name__}: {value}"
            obs = self._observation(value)
            if isinstance(obs, str):
                return f"{what}: {obs}"
            out.append(obs)
        return out

    def _observation(self, value: Any) -> Union[Optional[list[int]], str, tuple]:
        """ids, None (done, nothing appended) or ('done', ids); a str is an error."""
        if value is None:
            return None
        if isinstance(value, str):
            value = Observation(value)
        if not isinstance(value, Observation) or not isinstance(value.text, str):
            got = type(value.text if isinstance(value, Observation) else value).__name__
            return (f"step returned {got}; accepted: an Observation(text: str, done: bool), "
                    "a str, or None")
        try:
            ids = self.encode(value.text)
        except ValueError as err:
            return f"its observation cannot be tokenized ({err})"
        return ("done", ids) if value.done else ids

    def encode(self, text: str) -> list[int]:
        """An observation's ids: its text, or (`tool`) its chat-template tool message."""
        if self.observation_format == "tool":
            return self.tokenizer.tool_result_ids(text, **(self.template_kwargs or {}))
        return self.tokenizer.encode(text) if text else []

    def _share(self, payload, num: int) -> list:
        """Broadcast the source's answers (or its error) over the model-parallel group.

        Encoding: [status, k_0, ..., k_{num-1}, ids...] where k = -1 (done, nothing
        appended), or the id count with bit 62 set when the rollout ends after them;
        status 1 = error, then the message's UTF-8 bytes."""
        done_bit = 1 << 62
        if self.source:
            if isinstance(payload, str):
                flat = [1] + list(payload.encode("utf-8"))
            else:
                head, ids = [0], []
                for obs in payload:
                    if obs is None:
                        head.append(-1)
                    elif isinstance(obs, tuple):
                        head.append(len(obs[1]) | done_bit)
                        ids += obs[1]
                    else:
                        head.append(len(obs))
                        ids += obs
                flat = head + ids
        many = self.mp_group is not None and dist.get_world_size(self.mp_group) > 1
        if many:
            size = torch.tensor([len(flat) if self.source else 0], dtype=torch.long, device=self.device)
            dist.broadcast(size, group=self.mp_group, group_src=0)
            data = (torch.tensor(flat, dtype=torch.long, device=self.device) if self.source
                    else torch.empty(int(size), dtype=torch.long, device=self.device))
            dist.broadcast(data, group=self.mp_group, group_src=0)
            flat = data.tolist()
        if flat[0] == 1:
            raise EnvironmentFailed(bytes(flat[1:]).decode("utf-8"))
        out, at = [], 1 + num
        for k in flat[1:1 + num]:
            if k == -1:
                out.append(None)
                continue
            count = k & ~done_bit
            ids = flat[at:at + count]
            at += count
            out.append(("done", ids) if k & done_bit else ids)
        return out

"""Prompt data: files -> tokenized prompts (chat templates, overlong policy). Formats,
fields and policies: docs/data.md. Files and row parsing live in `data.sources`, the
DP-sharded resumable sampler and loader in `data.sampler`.

Memory: one pass at setup validates every row (a malformed row stops the run there, with
file and line) and tokenizes it; the dataset then holds only the kept prompts' token ids
(one flat int32 array) and three ints per prompt (file, line, byte offset or row). Id,
answer and text are read back from the file for the prompts of each batch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import zlib
from array import array
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from tip_megatron.data.sources import (
    CHUNK_ROWS, PromptFields, PromptRecord, Row, open_source, parse_row,
)
from tip_megatron.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "OVERLONG_POLICIES",
    "PromptDataset",
    "PromptFields",
    "PromptRecord",
]

OVERLONG_POLICIES = ("truncate_left", "skip")


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix a tokenizer's ValueError (unknown character, no chat template) with file:line."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _encode_located(batch_fn: Callable[[list[Any]], list[list[int]]],
                    row_fn: Callable[[Any], list[int]], inputs: list[Any],
                    wheres: list[str]) -> list[list[int]]:
    """`batch_fn(inputs)`; if it raises ValueError, row by row so the error names its row."""
    try:
        return batch_fn(inputs)
    except ValueError:
        out = []
        for x, where in zip(inputs, wheres):
            with _located(where):
                out.append(row_fn(x))
        return out


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PromptDataset:
    """Tokenized prompts from JSONL / parquet files, in file order, overlong policy applied.

    `stats` (ints): num_rows, num_kept, num_truncated, num_skipped, num_tokens (kept, after
    truncation), max_prompt_tokens (longest prompt before the policy),
    num_assistant_turns_dropped (trailing assistant turns removed from chat rows).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        *,
        fields: PromptFields = PromptFields(),
        apply_chat_template: bool = False,
        max_prompt_len: int | None = None,
        overlong: str = "truncate_left",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}: accepted values are {OVERLONG_POLICIES}")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise ValueError(f"max_prompt_len={max_prompt_len}: must be >= 1 or None (no limit)")
        single = isinstance(paths, (str, os.PathLike))
        self.paths = [Path(p) for p in ([paths] if single else paths)]
        if not self.paths:
            raise ValueError("PromptDataset needs at least one prompt file")
        self.tokenizer, self.fields = tokenizer, fields
        self.apply_chat_template = apply_chat_template
        # Chat-rendered rows only: the template's extra variables (`enable_thinking`) and a
        # system message put first where a row has none.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.system_prompt = system_prompt
        self.max_prompt_len, self.overlong = max_prompt_len, overlong
        self._sources = [open_source(p, fields) for p in self.paths]
        self.stats = dict.fromkeys(("num_rows", "num_kept", "num_truncated", "num_skipped",
                                    "num_tokens", "max_prompt_tokens",
                                    "num_assistant_turns_dropped"), 0)
        self._crc32: int | None = None
        self.route_where: dict[str, str] = {}
        """`fields.route`: each route value -> the first "<file>, line <n>" that has it."""
        self._build()

    def _build(self) -> None:
        tokens, starts = array("i"), array("q", [0])
        files, lines, locs = array("i"), array("q"), array("q")
        routes, values = array("i"), {}  # data.route_field: a code per prompt, value -> code
        for f, src in enumerate(self._sources):
            for chunk in _chunks(src.rows(), CHUNK_ROWS):
                wheres = [src.where(line) for line, _, _ in chunk]
                rows = [parse_row(row, self.fields, w, src.default_id(line))
                        for (line, _, row), w in zip(chunk, wheres)]
                for (line, loc, _), w, ids, row in zip(chunk, wheres, self._tokenize(rows, wheres), rows):
                    if not ids:
                        raise ValueError(f"{w}: the prompt tokenizes to no tokens")
                    ids = self._fit(ids)
                    if ids is None:
                        continue
                    if row.route is not None:
                        routes.append(values.setdefault(row.route, len(values)))
                        self.route_where.setdefault(row.route, w)
                    tokens.extend(ids)
                    starts.append(len(tokens))
                    files.append(f)
                    lines.append(line)
                    locs.append(loc)
                self.stats["num_rows"] += len(rows)
                self.stats["num_assistant_turns_dropped"] += sum(r.dropped_turns for r in rows)
        self._tokens, self._files = np.frombuffer(tokens, np.int32), np.frombuffer(files, np.int32)
        self._starts, self._lines, self._locs = (np.frombuffer(a, np.int64)
                                                 for a in (starts, lines, locs))
        self._routes, self.route_values = np.frombuffer(routes, np.int32), list(values)
        self.stats.update(num_kept=len(self._files), num_tokens=len(self._tokens))
        where = ", ".join(map(str, self.paths))
        if not self.stats["num_rows"]:
            raise ValueError(f"no prompts in {where}: the file(s) hold no rows; accepted: JSONL "
                             "with one JSON object per line, or parquet, with at least one row")
        if not len(self._files):
            raise ValueError(f"no prompts left in {where} (stats: {self.stats}): overlong='skip' "
                             f"dropped every prompt; raise max_prompt_len (now {self.max_prompt_len}) "
                             "or use overlong='truncate_left'")
        changed = self.stats["num_skipped"] or self.stats["num_truncated"]
        (logger.warning if changed else logger.info)("prompts from %s: %s", where, self.stats)

    def _tokenize(self, rows: list[Row], wheres: list[str]) -> list[list[int]]:
        tok, out = self.tokenizer, [[] for _ in rows]
        is_chat = [r.messages is not None or self.apply_chat_template for r in rows]
        chat = [k for k, c in enumerate(is_chat) if c and rows[k].tools is None]
        plain = [k for k, c in enumerate(is_chat) if not c]
        # Rows with tool schemas are rendered one by one (each hands the template its own
        # `tools`); a plain row's tools are ignored (no template renders it).
        for k in [k for k, c in enumerate(is_chat) if c and rows[k].tools is not None]:
            conversation = self._with_system(rows[k].messages or [{"role": "user", "content": rows[k].text}])
            with _located(wheres[k]):
                out[k] = tok.apply_chat_template(conversation, tools=rows[k].tools,
                                                 **self.chat_template_kwargs)
        conversations = [self._with_system(rows[k].messages or [{"role": "user", "content": rows[k].text}])
                         for k in chat]
        kw = self.chat_template_kwargs
        encoded = _encode_located(partial(tok.apply_chat_template_batch, **kw),
                                  partial(tok.apply_chat_template, **kw),
                                  conversations, [wheres[k] for k in chat])
        for k, ids in zip(chat, encoded):
            out[k] = ids
        # Plain prompts get the tokenizer's special tokens (an HF tokenizer's own BOS
        # policy; SentencePiece: BOS); chat templates write theirs themselves.
        encoded = _encode_located(partial(tok.encode_batch, add_special_tokens=True),
                                  partial(tok.encode, add_special_tokens=True),
                                  [rows[k].text for k in plain], [wheres[k] for k in plain])
        for k, ids in zip(plain, encoded):
            out[k] = ids
        return out

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.system_prompt is None or (messages and messages[0].get("role") == "system"):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _fit(self, ids: list[int]) -> list[int] | None:
        n, limit = len(ids), self.max_prompt_len
        self.stats["max_prompt_tokens"] = max(self.stats["max_prompt_tokens"], n)
        if limit is None or n <= limit:
            return ids
        if self.overlong == "skip":
            self.stats["num_skipped"] += 1
            return None
        self.stats["num_truncated"] += 1
        return ids[-limit:]  # truncate_left: keep the end, where the question usually is

    def __len__(self) -> int:
        return len(self._files)

    @property
    def lengths(self) -> np.ndarray:
        """[num_prompts] int64 prompt lengths in tokens."""
        return np.diff(self._starts)

    def content_crc32(self) -> int:
        """crc32 of all kept token ids and prompt boundaries: equal data, equal value."""
        if self._crc32 is None:
            self._crc32 = zlib.crc32(self._starts, zlib.crc32(self._tokens))
        return self._crc32

    def file_fingerprints(self) -> list[dict[str, Any]]:
        """Per file: name, size, sha256 of its content, and `num_prompts` kept from it."""
        kept = np.bincount(self._files, minlength=len(self._sources))
        return [{**s.fingerprint.to_dict(), "num_prompts": int(n)}
                for s, n in zip(self._sources, kept)]

    def token_ids(self, i: int) -> list[int]:
        """Token ids of prompt `i` (memory only, no file read)."""
        self._check_index(i)
        return self._tokens[self._starts[i]:self._starts[i + 1]].tolist()

    def route(self, i: int) -> str:
        """The `fields.route` value of prompt `i` (memory only); KeyError without that field."""
        self._check_index(i)
        if not len(self._routes):
            raise KeyError("the prompts were read without a route field (data.route_field)")
        return self.route_values[self._routes[i]]

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records([i])[0]

    def records(self, indices: Sequence[int]) -> list[PromptRecord]:
        """Full records for `indices`, in that order; reads each file once per call."""
        for i in indices:
            self._check_index(i)
        out: list[PromptRecord | None] = [None] * len(indices)
        idx = np.asarray(indices, dtype=np.int64)
        for f in np.unique(self._files[idx]) if len(idx) else []:
            src, pos = self._sources[f], np.nonzero(self._files[idx] == f)[0]
            lines, locs = self._lines[idx[pos]].tolist(), self._locs[idx[pos]].tolist()
            for p, line, row in zip(pos, lines, src.fetch(locs, lines)):
                r = parse_row(row, self.fields, src.where(line), src.default_id(line))
                out[p] = PromptRecord(r.prompt_id, self.token_ids(int(idx[p])), r.answer,
                                      r.text, r.messages, where=src.where(line), tools=r.tools)
        return out  # type: ignore[return-value]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"prompt index {i} outside [0, {len(self)})")

"""Tokenizers behind one small protocol: HF (local directory), SentencePiece, characters.

The engine only ever sees `Tokenizer`: ids in and out, the special ids generation needs
(`eos_id`, `pad_id`, `stop_ids`), chat templates, and a vocabulary `fingerprint()` that
setup compares between teacher and student so a tokenizer mismatch stops the run before
the first step. Nothing here downloads: HF tokenizers load with `local_files_only=True`
and never with `trust_remote_code`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = [
    "ACCEPTED_TOKENIZER_PATHS",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "fallback_chat_text",
    "load_tokenizer",
    "vocab_fingerprint",
]

ACCEPTED_TOKENIZER_PATHS = (
    "a local directory with HF tokenizer files (tokenizer.json and/or tokenizer_config.json), "
    "a directory holding only a SentencePiece tokenizer.model, or a SentencePiece .model file"
)

Message = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer. Ids are plain Python ints."""

    name: str
    vocab_size: int  # true size: max id + 1, before any padding of the embedding table
    eos_id: int
    pad_id: int  # eos_id when the tokenizer defines no pad token
    bos_id: int | None
    stop_ids: tuple[int, ...]  # ids that end generation; always contains eos_id

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = False
    ) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]: ...

    def apply_chat_template_batch(
        self, conversations: Sequence[Sequence[Message]], **template_kwargs: Any
    ) -> list[list[int]]: ...

    def fingerprint(self) -> str: ...


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """sha256 of the token -> id map: equal iff the maps are equal (order-independent)."""
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def fallback_chat_text(messages: Sequence[Message]) -> str:
    """The documented chat format for tokenizers without a template (opt-in).

    `System: ...\\n\\nUser: ...\\n\\nAssistant:` -- each message as `Role: content` followed
    by a blank line, then the generation prompt `Assistant:`. Encoded with the
    tokenizer's special tokens (a SentencePiece BOS is prepended).
    """
    turns = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"


class _Base:
    """Shared pieces; subclasses provide encode/decode and `_vocab()`."""

    name: str
    vocab_size: int
    chat_fallback: bool = False
    _fingerprint: str | None = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = False
    ) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def apply_chat_template(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]:
        raise NotImplementedError

    def apply_chat_template_batch(
        self, conversations: Sequence[Sequence[Message]], **template_kwargs: Any
    ) -> list[list[int]]:
        """`template_kwargs` are the template's extra variables (`enable_thinking=False`);
        the plain fallback format has none and ignores them."""
        return [self.apply_chat_template(m, **template_kwargs) for m in conversations]

    def tool_result_ids(self, text: str, **template_kwargs: Any) -> list[int]:
        """Ids of a tool result as the chat template renders it after an assistant turn
        (HF tokenizers with a template only; see HFTokenizer)."""
        raise ValueError(f"tokenizer {self.name} has no chat template: tool results "
                         "(rollout.observation_format=tool) need an HF tokenizer with one")

    def _decodable(self, ids: Sequence[int]) -> list[int]:
        """`ids` as ints; ValueError naming the first id this tokenizer has no piece for
        (HF would drop it from the text without a word, SentencePiece raise IndexError)."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"tokenizer {self.name}: id {bad} outside [0, {self.vocab_size}): "
                             "no piece to decode it to; ids the model may produce beyond the "
                             "tokenizer are masked in sampling (docs/data.md)")
        return ids

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = vocab_fingerprint(self._vocab())
        return self._fingerprint

    def _vocab(self) -> Mapping[str, int]:
        raise NotImplementedError

    def _fallback_chat(self, messages: Sequence[Message], why: str) -> list[int]:
        if not self.chat_fallback:
            raise ValueError(
                f"tokenizer {self.name} {why}; give the tokenizer a chat template, or "
                "opt in to the plain fallback format with load_tokenizer(..., "
                "chat_fallback=True) (see docs/data.md)"
            )
        return self.encode(fallback_chat_text(messages), add_special_tokens=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer(_Base):
    """A transformers tokenizer loaded from a local directory."""

    def __init__(self, path: str | os.PathLike, *, chat_fallback: bool = False):
        try:
            # optional extra [hf]; heavy (seconds): only HF tokenizers need it
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "HF tokenizers need the `transformers` package: "
                "`pip install 'tip_megatron[hf]'`"
            ) from e
        self.name = str(path)
        self.chat_fallback = chat_fallback
        try:
            self.hf = AutoTokenizer.from_pretrained(
                self.name, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise ValueError(f"could not load an HF tokenizer from {self.name}: {e}") from e
        vocab = self.hf.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {self.name} defines no eos token; generation needs one")
        self.eos_id = int(self.hf.eos_token_id)
        pad = self.hf.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.bos_id = None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)
        self.stop_ids = (self.eos_id, *_generation_config_eos(Path(self.name), self.eos_id))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = False
    ) -> list[list[int]]:
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=add_special_tokens,
                      return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(self._decodable(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]:
        return self.apply_chat_template_batch([messages], **template_kwargs)[0]

    def apply_chat_template_batch(
        self, conversations: Sequence[Sequence[Message]], **template_kwargs: Any
    ) -> list[list[int]]:
        if not getattr(self.hf, "chat_template", None):
            return [self._fallback_chat(m, "has no chat template") for m in conversations]
        # Render, then encode without special tokens: templates write BOS themselves, and
        # this is what transformers does for tokenize=True (whose return type changed in
        # 5.x). Encoding the batch at once lets the Rust tokenizer use all cores.
        texts = [self.hf.apply_chat_template([dict(m) for m in messages],
                                             add_generation_prompt=True, tokenize=False,
                                             **template_kwargs)
                 for messages in conversations]
        return self.encode_batch(texts, add_special_tokens=False)

    def tool_result_ids(self, text: str, **template_kwargs: Any) -> list[int]:
        """The ids that follow an assistant turn when a tool answers `text`: the end of the
        assistant message, the tool message (the template's tool role: e.g. Qwen3's
        `<tool_response>` inside a user turn) and the opening of the next assistant turn,
        cut from the template's rendering of [user, assistant(MARK), tool(text)] after a
        marker content (what a served model's next prompt holds after its own turn)."""
        if not getattr(self.hf, "chat_template", None):
            return super().tool_result_ids(text)
        mark = "\ue000tip-turn\ue000"
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark},
                    {"role": "tool", "content": text}]
        try:
            rendered = self.hf.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False, **template_kwargs)
        except Exception as err:  # noqa: BLE001 - jinja raises its own TemplateError types
            raise ValueError(f"tokenizer {self.name}: its chat template cannot render a tool "
                             f"message ({type(err).__name__}: {err})") from None
        if rendered.count(mark) != 1:
            raise ValueError(f"tokenizer {self.name}: its chat template does not render the "
                             "assistant's content verbatim; tool results cannot be placed after it")
        return self.encode(rendered.split(mark, 1)[1])

    def _vocab(self) -> Mapping[str, int]:
        return self.hf.get_vocab()


def _generation_config_eos(directory: Path, eos_id: int) -> tuple[int, ...]:
    """Extra stop ids from generation_config.json (Llama 3 lists eot and eom beside eos)."""
    gen = directory / "generation_config.json"
    if not directory.is_dir() or not gen.is_file():
        return ()
    try:
        ids = json.loads(gen.read_text()).get("eos_token_id")
    except ValueError as e:
        raise ValueError(f"{gen}: invalid JSON ({e})") from e
    ids = [ids] if isinstance(ids, int) else (ids or [])
    return tuple(dict.fromkeys(int(i) for i in ids if int(i) != eos_id))


class SentencePieceTokenizer(_Base):
    """A SentencePiece `.model` file. BOS is prepended when `add_special_tokens=True`."""

    def __init__(self, path: str | os.PathLike, *, chat_fallback: bool = False):
        try:
            # optional extra [hf]: only .model files need sentencepiece
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(
                "SentencePiece tokenizers need the `sentencepiece` package: "
                "`pip install 'tip_megatron[hf]'`"
            ) from e
        self.name = str(path)
        self.chat_fallback = chat_fallback
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.name)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.name} is not a valid SentencePiece model: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {self.name} has no eos piece; "
                             "generation needs one")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = self.sp.encode(text, out_type=int)
        if add_special_tokens and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = self._decodable(ids)
        if skip_special_tokens:
            special = {self.eos_id, self.pad_id, self.bos_id}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    def apply_chat_template(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]:
        return self._fallback_chat(messages, "is a SentencePiece model without a chat template")

    def _vocab(self) -> Mapping[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}


class CharTokenizer(_Base):
    """One id per character, for the embedded synthetic tasks (e.g. `12+34=46`).

    Ids: `chars[i] -> i` (default `0123456789+=`: digits 0-9 are ids 0-9, `+` is 10, `=`
    is 11), then `eos_id = len(chars)` and `pad_id = len(chars) + 1`; no BOS.
    """

    EOS, PAD = "<eos>", "<pad>"

    def __init__(self, chars: str = "0123456789+="):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"CharTokenizer chars must be non-empty and distinct, got {chars!r}")
        self.chars = chars
        self.name = f"char:{chars}"
        self._ids = {c: i for i, c in enumerate(chars)}
        self.eos_id, self.pad_id, self.bos_id = len(chars), len(chars) + 1, None
        self.vocab_size = len(chars) + 2
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"CharTokenizer: character {e.args[0]!r} not in its vocabulary {self.chars!r}"
            ) from None

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        special = {self.eos_id: self.EOS, self.pad_id: self.PAD}
        out = []
        for i in ids:
            i = int(i)
            if i in special:
                out.append("" if skip_special_tokens else special[i])
            elif 0 <= i < len(self.chars):
                out.append(self.chars[i])
            else:
                raise ValueError(f"CharTokenizer: id {i} outside [0, {self.vocab_size})")
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[Message], **template_kwargs: Any) -> list[int]:
        raise ValueError("CharTokenizer has no chat format; use plain prompts")

    def _vocab(self) -> Mapping[str, int]:
        return {**self._ids, self.EOS: self.eos_id, self.PAD: self.pad_id}


def load_tokenizer(path: str | os.PathLike, *, chat_fallback: bool = False) -> Tokenizer:
    """Load a local tokenizer; see `ACCEPTED_TOKENIZER_PATHS`.

    `chat_fallback=True` lets tokenizers without a chat template use
    `fallback_chat_text`; otherwise chat prompts on such a tokenizer raise ValueError.
    """
    p, accepted = Path(path), f"accepted: {ACCEPTED_TOKENIZER_PATHS}"
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist; {accepted}")
    if p.is_file():
        if p.suffix == ".model":
            return SentencePieceTokenizer(p, chat_fallback=chat_fallback)
        raise ValueError(f"tokenizer file {p} is not a SentencePiece .model; {accepted}")
    names = {c.name for c in p.iterdir()}
    if names & {"tokenizer.json", "tokenizer_config.json"}:
        return HFTokenizer(p, chat_fallback=chat_fallback)
    if "tokenizer.model" in names:
        return SentencePieceTokenizer(p / "tokenizer.model", chat_fallback=chat_fallback)
    shown = ", ".join(sorted(names)[:10]) or "nothing"
    raise ValueError(f"no tokenizer found in {p} (it holds: {shown}); {accepted}")

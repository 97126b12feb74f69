"""The run config's `data:` section: where prompts come from and how they are tokenized
(docs/data.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tip_megatron.data.sources import PromptFields
from tip_megatron.runtime.typed_tree import at_least, check_seed


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are tokenized."""

    prompts: tuple[str, ...] = ()
    """Prompt files (JSONL or parquet); empty = the embedded task of a builtin student
    that has one (the quickstart's)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or SentencePiece .model; `char` = the embedded task's character
    tokenizer; null = the one bundled with the student checkpoint / HF directory."""
    prompt_field: str = "prompt"
    """Record field holding a plain-text prompt."""
    messages_field: str = "messages"
    """Record field holding a chat prompt (a list of {role, content}); rendered through the
    tokenizer's chat template. Used when a record has it and no `prompt_field`."""
    answer_field: str = "answer"
    """Record field holding the reference answer (kept for evaluation; not used in training)."""
    apply_chat_template: bool = False
    """Render plain prompts through the tokenizer's chat template too."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template (e.g. {enable_thinking: false} for Qwen3);
    also used by validation (`eval`)."""
    system_prompt: Optional[str] = None
    """A system message put first in every chat-rendered prompt that has none."""
    max_prompt_len: int = 2048
    """Longer prompts are handled by `overlong` (the paper: prompts up to 2048)."""
    overlong: str = "truncate_left"
    """truncate_left | skip (counted and reported either way)."""
    prompts_per_step: int = 8
    """Global prompts per step (divided over data-parallel ranks)."""
    seed: int = 1234
    """Shuffle seed."""
    route_field: Optional[str] = None
    """Several teachers (`teachers:`): the prompt record field whose value picks the prompt's
    teacher (`teachers[i].serves`); every record must have it (file and line named)."""
    allow_tokenizer_override: bool = False
    """Accept a `data.tokenizer` that differs from the one bundled with the student (its
    token ids would not mean what the student learned); off: such a run is refused."""

    def prompt_fields(self) -> PromptFields:
        """The record fields the prompt files are read with."""
        return PromptFields(prompt=self.prompt_field, messages=self.messages_field,
                            answer=self.answer_field, route=self.route_field)

    def validate(self, prefix: str = "data.") -> None:
        at_least(prefix, self, prompts_per_step=1, max_prompt_len=1)
        check_seed(f"{prefix}seed", self.seed)

"""What the generation engine is asked for and what it returns (`rollout/generate.py`).

Shapes: rows B = prompts * n (row = prompt * n + sample), output tokens [B, L]
right-padded; kept hidden states [response tokens, h] (compute dtype, last pipeline stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch

from tip_megatron.rollout import decode

ENGINES = ("dynamic", "static")
OBSERVATION_FORMATS = ("text", "tool")


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample: the run config's `rollout` section, and the options of
    `GenerationConfig` a user chooses (the rest come from the tokenizer and the engine)."""

    n: int = 1
    """Samples per prompt; rows of one prompt are consecutive (the paper: 16)."""
    max_new_tokens: int = 256
    """Tokens generated per sample at most, the stop token included (the paper: 8192).
    With `env`: the budget of every turn and observation together (tokens after the
    prompt); an observation that does not fit is cut and ends the rollout."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax, lowest id on ties; log-probs are 0)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens with probability >= top_p (1 = all)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    env: Optional[str] = None
    """Multi-turn rollouts: the environment factory as an import path
    `package.module:Factory`, called as `Factory(record, **env_args)` once per rollout
    (docs/multiturn.md); null = one turn, no environment."""
    env_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment factory."""
    max_turns: int = 4
    """With `env`: turns the model generates at most; the rollout ends after the last."""
    turn_stop: tuple[str, ...] = ()
    """With `env`: strings that end a turn and hand it to the environment (e.g. a tool
    call's closing tag); EOS ends the rollout. Needs at least one."""
    observation_format: str = "text"
    """With `env`: `text` appends the observation's text as tokenized; `tool` renders it
    through the chat template's tool role (the end of the assistant message, the tool
    message, the next assistant header: what a served model sees; HF tokenizers with a
    chat template; docs/multiturn.md)."""
    env_timeout_s: float = 30.0
    """With `env`: seconds one environment call may take; a slower one stops the run with
    an error naming the environment, the prompt and the turn."""

    def validate(self, prefix: str = "") -> None:
        """ValueError naming `<prefix><field>` and the accepted values (the run config
        passes `rollout.`)."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{prefix}n={self.n!r}: must be an integer >= 1")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise ValueError(f"{prefix}temperature={self.temperature!r}: must be a finite number "
                             ">= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{prefix}top_p={self.top_p!r}: must be in (0, 1] (1 = no top-p)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{prefix}top_k={self.top_k!r}: must be an integer >= 0 (0 = no top-k)")
        if self.env is None:
            return
        module, sep, name = self.env.partition(":") if isinstance(self.env, str) else ("", "", "")
        if not (module and sep and name):
            raise ValueError(f"{prefix}env={self.env!r}: must be an import path 'package.module:Factory'")
        if not isinstance(self.env_args, dict):
            raise ValueError(f"{prefix}env_args={self.env_args!r}: must be a mapping of keyword arguments")
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"{prefix}max_turns={self.max_turns!r}: must be an integer >= 1")
        if not self.turn_stop or not all(isinstance(t, str) and t for t in self.turn_stop):
            raise ValueError(f"{prefix}turn_stop={list(self.turn_stop)!r}: with {prefix}env, a list of "
                             "one or more non-empty strings that end a turn (e.g. '</call>')")
        if self.observation_format not in OBSERVATION_FORMATS:
            raise ValueError(f"{prefix}observation_format={self.observation_format!r}: accepted values "
                             f"are {OBSERVATION_FORMATS}")
        if not self.env_timeout_s > 0 or self.env_timeout_s == float("inf"):
            raise ValueError(f"{prefix}env_timeout_s={self.env_timeout_s!r}: must be a finite number > 0")

    @property
    def multi_turn(self) -> bool:
        return self.env is not None


@dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """How to decode (the model and the prompts are arguments of `generate`): the sampling
    options plus the tokenizer's ids and the engine's implementation choices."""

    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sample (the tokenizer's `stop_ids`); empty = max tokens only."""
    pad_id: int = 0
    """Id written after a sample ends and in the padding (the tokenizer's `pad_id`)."""
    use_kv_cache: bool = True
    """False recomputes the whole sequence every step (reference and benchmark only)."""
    layer_impl: str = "auto"
    """Transformer layers: `megatron` (megatron's TransformerBlock, any layer spec),
    `functional` (the same layer over megatron's parameters, local spec; faster per
    step), `auto` (functional when the model qualifies). See rollout/decode.py."""
    engine: str = "dynamic"
    """`dynamic` (rows leave the batch when they stop, waiting prompts join; rollout/
    batching.py) or `static` (every row decoded until the longest is done: the engine as
    it was, kept for comparison and benchmarks). Both draw the same samples."""
    max_batch_tokens: int = 0
    """KV-cache positions of the dynamic engine's batch: rows held at once = this //
    (longest prompt + max_new_tokens), at least n; 0 = every row at once."""
    check_logprobs: bool = False
    """Rerun the rollouts through the training forward and report the largest and mean gap
    of the sampled tokens' log-probs (`Rollouts.logprob_gap`; rollout/consistency.py)."""
    cuda_graph: bool = False
    """Capture the decode step's forward in a CUDA graph and replay it (CUDA only; the
    static engine with the KV cache, pipeline size 1, functional layers; not yet run on
    a GPU: rollout/cuda_graph.py)."""
    vocab_limit: int = 0
    """Ids the sampler may draw: [0, vocab_limit), masked like the padded columns beyond
    it. The tokenizer's size where it is smaller than the model's true vocabulary (real
    checkpoints pad their embedding table: those ids cannot be decoded); 0 = the model's
    whole true vocabulary. See docs/data.md, "Vocabulary coverage"."""
    keep_hidden: bool = False
    """Keep, on the last pipeline stage, the student's final hidden state (after the final
    norm: the output layer's input) at every position that predicted a response token
    (`Rollouts.response_hidden`), for scoring without a second student forward
    (`selection.prepass_source=generation`). Both engines; not with `cuda_graph`."""

    def __post_init__(self) -> None:
        self.validate()
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: accepted values are {ENGINES}")
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens!r}: must be an integer >= 0 (0 = all rows)")
        if not isinstance(self.vocab_limit, int) or self.vocab_limit < 0:
            raise ValueError(f"vocab_limit={self.vocab_limit!r}: must be an integer >= 0 (0 = the model's vocabulary)")
        if self.layer_impl not in decode.LAYER_IMPLS:
            raise ValueError(f"layer_impl={self.layer_impl!r}: accepted values are {decode.LAYER_IMPLS}")
        if self.cuda_graph and (self.engine != "static" or not self.use_kv_cache):
            raise ValueError(f"cuda_graph=True needs engine='static' and use_kv_cache=True "
                             f"(got engine={self.engine!r}, use_kv_cache={self.use_kv_cache})")
        if self.multi_turn and self.cuda_graph:
            raise ValueError("multi-turn rollouts (env) do not run with cuda_graph; turn it off")
        if self.keep_hidden and self.cuda_graph:
            raise ValueError("keep_hidden=True does not run with cuda_graph=True (the captured "
                             "step returns logits only); turn one off")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "turn_stop", tuple(self.turn_stop))

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int,
                      **engine) -> "GenerationConfig":
        """The one conversion from the run config's `rollout` section."""
        chosen = {f.name: getattr(sampling, f.name) for f in fields(SamplingConfig)}
        return cls(**chosen, stop_ids=tuple(stop_ids), pad_id=pad_id, **engine)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample_vocab(self, true_vocab: int) -> int:
        """How many leading ids the sampler may draw from a model of `true_vocab` ids."""
        return min(true_vocab, self.vocab_limit) if self.vocab_limit > 0 else true_vocab


@dataclass
class Rollouts:
    """Generated samples, identical on every rank of the model-parallel group.

    Row r holds prompt `prompt_index[r]`, sample `sample_index[r]`: its prompt tokens, then
    its response, then `pad_id` (right padding: token j sits at position j, as training
    forwards expect).
    """

    token_ids: torch.Tensor
    """[B, L] int64: prompt, response, padding."""
    response_mask: torch.Tensor
    """[B, L] bool: True on generated tokens (the stop token included), False on prompt,
    observations and padding: the tokens that are trained and selected."""
    logprobs: torch.Tensor
    """[B, L] float32: log-prob of each generated token under the sampling distribution
    (temperature, top-k, top-p applied; 0 when greedy); 0 outside the response."""
    prompt_lengths: torch.Tensor
    """[B] int64."""
    response_lengths: torch.Tensor
    """[B] int64: tokens after the prompt, the stop token included (multi-turn:
    observations included; `response_mask.sum(1)` counts the generated ones)."""
    stopped: torch.Tensor
    """[B] bool: the sample ended with a stop id (False: it hit max_new_tokens; multi-turn:
    or max_turns, or its environment ended it)."""
    prompt_index: torch.Tensor
    """[B] int64: index into the `prompts` argument."""
    sample_index: torch.Tensor
    """[B] int64: 0 .. n-1."""
    stats: Optional[dict] = None
    """Timings and sizes of the call on this rank (prefill_s, decode_s, row_steps,
    kv_cache_bytes, ...: batching.EngineStats)."""
    logprob_gap: Optional[dict] = None
    """With `check_logprobs`: {"max", "mean"} |engine - training forward| log-prob of the
    sampled tokens (rollout/consistency.py)."""
    response_hidden: Optional[torch.Tensor] = None
    """With `keep_hidden`, on the last pipeline stage (None elsewhere): [response tokens, h]
    in the compute dtype, row-major (row 0's response positions, then row 1's, ...): entry
    j of row r is the final hidden state at the position before generated token j, the one
    that sampled it (one turn: position prompt_lengths[r] + j - 1; multi-turn: the last
    observation position for a turn's first token). The training batch's target positions
    of row r, in order."""

    turn_ids: Optional[torch.Tensor] = None
    """Multi-turn only: [B, L] int64, the turn index (0, 1, ...) of each generated token,
    -1 elsewhere (prompt, observations, padding)."""
    num_turns: Optional[torch.Tensor] = None
    """Multi-turn only: [B] int64, turns the model generated."""

    @property
    def observation_mask(self) -> torch.Tensor:
        """[B, L] bool: environment tokens (after the prompt, not generated, not padding)."""
        cols = torch.arange(self.token_ids.shape[1], device=self.token_ids.device)[None, :]
        after = (cols >= self.prompt_lengths[:, None]) & \
            (cols < (self.prompt_lengths + self.response_lengths)[:, None])
        return after & ~self.response_mask

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    def response(self, row: int) -> list[int]:
        """The generated ids of one row."""
        start = int(self.prompt_lengths[row])
        return self.token_ids[row, start:start + int(self.response_lengths[row])].tolist()



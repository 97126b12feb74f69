"""Typed architecture description of the model families we distill, read from HF configs.

Families: `llama` (Llama 3.x, rope scaling carried through), `qwen2` (Qwen2/Qwen2.5: qkv
bias), `qwen3` (q/k RMSNorm, no qkv bias, explicit head_dim). All: GQA, RoPE, RMSNorm,
SwiGLU, tied or untied embeddings, no biases on the other linears.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

#: HF `model_type` -> our family name.
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILIES = ("llama", "qwen2", "qwen3")

#: Family traits that HF configs do not spell out.
_FAMILY_TRAITS = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
}

#: HF config fields whose non-default values we cannot honour: field -> accepted values.
_UNSUPPORTED_HF_FIELDS = {
    "use_sliding_window": (False, None),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "attention_bias": (False, None),  # llama-style bias on q/k/v/o
    "mlp_bias": (False, None),
    "hidden_act": ("silu",),
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    """Architecture of one decoder-only model (student or teacher)."""

    family: str
    """One of `FAMILIES`: llama | qwen2 | qwen3."""
    vocab_size: int
    """True vocabulary size (HF `vocab_size`, i.e. embedding rows). TP padding is added on
    top of it when the model is built and never receives probability mass."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    """Key/value heads (GQA). Equal to num_attention_heads for plain MHA."""
    ffn_hidden_size: int
    head_dim: Optional[int] = None
    """Per-head size; None means hidden_size // num_attention_heads (qwen3 sets it)."""
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: Optional[RopeScaling] = None
    extra: dict = field(default_factory=dict, compare=False)
    """HF config fields carried through unchanged (for export), not used by the model."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; accepted: {list(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_kv_heads", "ffn_hidden_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer")
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly"
            )

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate_parallel(self, tp: int, pp: int, vpp: Optional[int] = None) -> None:
        """Raise ValueError (before any process group exists) if the layout cannot cut it."""
        accepted = self.accepted_tp()
        for name, size, why in (("num_attention_heads", self.num_attention_heads, ""),
                                ("num_kv_heads", self.num_kv_heads,
                                 " (GQA key/value heads are split, not replicated)"),
                                ("ffn_hidden_size", self.ffn_hidden_size, "")):
            if size % tp != 0:
                raise ValueError(f"tensor parallel size {tp} does not divide {name}={size}{why}; "
                                 f"accepted tp: {accepted}")
        stages = pp * (vpp or 1)
        if stages > self.num_layers:
            raise ValueError(
                f"pipeline stages pp*vpp = {stages} exceed num_layers={self.num_layers}; "
                f"accepted: pp*vpp <= {self.num_layers}"
            )
        if self.num_layers % stages != 0:
            raise ValueError(
                f"num_layers={self.num_layers} is not divisible by pp*vpp = {stages}; accepted "
                f"pp*vpp: {_divisors(self.num_layers)}"
            )

    def accepted_tp(self) -> list[int]:
        """TP sizes that divide the attention heads, the KV heads and the FFN width."""
        return [t for t in _divisors(self.num_attention_heads)
                if self.num_kv_heads % t == 0 and self.ffn_hidden_size % t == 0]

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Vocabulary rows after Megatron's padding: a multiple of divisible_by * tp."""
        return padded_vocab_size(self.vocab_size, tp, divisible_by)

    # ------------------------------------------------------------------ HF config I/O
    @classmethod
    def from_hf_config(cls, config: Union[dict, str, Path]) -> "ModelArch":
        """Read an HF `config.json` (a dict, the file, or the directory holding it)."""
        cfg = _read_hf_config(config)
        model_type = cfg.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"HF model_type {model_type!r} is not supported; accepted: {sorted(HF_MODEL_TYPES)}"
            )
        for key, accepted in _UNSUPPORTED_HF_FIELDS.items():
            if key in cfg and cfg[key] not in accepted:
                raise ValueError(
                    f"HF config field {key}={cfg[key]!r} is not supported by tip_megatron "
                    f"(accepted: {list(accepted)})"
                )
        family = HF_MODEL_TYPES[model_type]
        heads = cfg["num_attention_heads"]
        explicit_head_dim = cfg.get("head_dim")
        if explicit_head_dim == cfg["hidden_size"] // heads and family != "qwen3":
            explicit_head_dim = None
        known = {"model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
                 "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                 "rope_scaling", "attention_bias"}
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            ffn_hidden_size=cfg["intermediate_size"],
            head_dim=explicit_head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope_theta=float(_rope_theta(cfg)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(cfg),
            extra={k: v for k, v in cfg.items() if k not in known},
            **_FAMILY_TRAITS[family],
        )

    def to_hf_config(self) -> dict:
        """The HF config.json fields for this architecture (inverse of from_hf_config)."""
        model_type = {v: k for k, v in HF_MODEL_TYPES.items()}[self.family]
        cfg = dict(self.extra)
        cfg.update(
            model_type=model_type,
            architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                            "qwen3": "Qwen3ForCausalLM"}[self.family]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.ffn_hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.family == "qwen3" or self.head_dim is not None:
            cfg["head_dim"] = self.kv_channels
        if self.family == "llama":
            cfg["attention_bias"] = False
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(rope_type="llama3", **asdict(self.rope_scaling))
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelArch":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model architecture fields {unknown}; accepted: {sorted(names)}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _read_hf_config(config: Union[dict, str, Path]) -> dict:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF config not found: {path} (expected a config.json or its directory)")
    return json.loads(path.read_text())


def _rope_theta(cfg: dict) -> Any:
    # transformers 5 moves rope_theta into `rope_parameters`; older configs keep it top-level.
    params = cfg.get("rope_parameters") or {}
    return cfg.get("rope_theta", params.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict) -> Optional[RopeScaling]:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"HF config rope_scaling type {kind!r} is not supported; accepted: llama3")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )

"""Where a model's weights come from: a model checkpoint (`ckpt`), an HF directory (`hf`),
or a named built-in (`builtin`) registered by the package that provides it.

    src = ModelSource(builtin="my-model")        # the run config's `student` / `teacher`
    arch = source_arch(src)                      # cheap: no weights are read or trained
    load_source_weights(chunks, groups, arch, src)

Built-ins. A provider is a function `() -> BuiltinModel`, registered by name with
`register_builtin(name, provider)`, as the callable itself or as a `"module:function"`
string that is imported only when the name is used. The registry knows no provider by
name and imports nothing of its own: on first use it reads the `tip_megatron.builtin_models`
entry points of the installed packages (`name = "module:function"`; tip_megatron's own
quickstart built-ins are declared so in setup.py). So a torchrun worker that reads
`student.builtin=...` from a YAML finds the provider with nothing imported by hand, and
loading a model never reaches an application above this layer. docs/design_notes.md has
the reasons.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tip_megatron.models.arch import ModelArch

KINDS = ("ckpt", "hf", "builtin")
ENTRY_POINT_GROUP = "tip_megatron.builtin_models"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from (exactly one of the three)."""

    ckpt: Optional[str] = None
    """A tip_megatron model checkpoint directory (e.g. from `tip-megatron convert hf-to-mcore`),
    a training step directory (`<run>/step_000200`) or a run directory (its newest complete
    step): `models.checkpoint.model_files` resolves all three."""
    hf: Optional[str] = None
    """An HF model directory (config.json + safetensors), converted in memory at start."""
    builtin: Optional[str] = None
    """A registered built-in model (`builtin_names()`; the quickstart registers
    `quickstart-teacher` and `quickstart-student`, pre-trained on its task and cached)."""

    def validate(self, name: str) -> None:
        """Cheap checks (no provider is called): one kind, the path exists, the name is known."""
        given = [k for k in KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"{name}: set exactly one of {name}.ckpt, {name}.hf, {name}.builtin "
                             f"(got {given or 'none'})")
        path = self.ckpt or self.hf
        if path and not Path(path).exists():
            raise ValueError(f"{name}.{given[0]}={path!r}: no such file or directory")
        if self.builtin and self.builtin not in builtin_names():
            raise ValueError(f"{name}.builtin={self.builtin!r}: accepted: {builtin_names()}")


@dataclass(frozen=True)
class BuiltinModel:
    """What a built-in provider returns. Building it must be cheap (validation calls it);
    the heavy parts are the callables, called at set-up only."""

    arch: ModelArch
    full_state: Callable[[Any], dict]
    """`(groups) -> FULL (unsharded) state dict`; collective: every rank calls it (it may
    train and cache the model at the caller's layout)."""
    tokenizer: Optional[Callable[[], Any]] = None
    """`() -> Tokenizer` the model was trained with (used when `data.tokenizer` is unset)."""
    prompts: Optional[Callable[[int, int, int, int], Any]] = None
    """`(prompts_per_rank, dp_rank, dp_size, seed) -> prompt source` (`next()`,
    `state_dict()`, `load_state_dict()`): the embedded task, used when `data.prompts` is empty."""


Provider = Union[str, Callable[[], BuiltinModel]]
_providers: dict[str, Provider] = {}
_resolved: dict[str, BuiltinModel] = {}
_discovered = False


def register_builtin(name: str, provider: Provider) -> None:
    """Register a built-in model source under `name` (idempotent for the same provider)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"builtin model name {name!r}: must be a non-empty string")
    if isinstance(provider, str) and ":" not in provider:
        raise ValueError(f"builtin model {name!r}: provider {provider!r} must be 'module:function'")
    old = _providers.get(name)
    if old is not None and old != provider:
        raise ValueError(f"builtin model {name!r} is already registered (provider {old!r})")
    _providers[name] = provider


def _discover() -> None:
    """Once per process: the installed packages' entry points."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        register_builtin(ep.name, ep.value)


def builtin_names() -> list[str]:
    """The accepted values of `student.builtin` / `teacher.builtin`."""
    _discover()
    return sorted(_providers)


def builtin_model(name: str) -> BuiltinModel:
    """The registered provider's `BuiltinModel` (called once per process)."""
    if name not in builtin_names():
        raise ValueError(f"builtin model {name!r}: accepted: {builtin_names()}")
    if name not in _resolved:
        provider = _providers[name]
        if isinstance(provider, str):
            module, _, attr = provider.partition(":")
            provider = getattr(importlib.import_module(module), attr)
        model = provider()
        if not isinstance(model, BuiltinModel):
            raise ValueError(f"builtin model {name!r}: its provider returned {type(model).__name__}, "
                             "expected a BuiltinModel")
        _resolved[name] = model
    return _resolved[name]


# ------------------------------------------------------------------ per kind
def source_arch(src: ModelSource) -> ModelArch:
    """The architecture, read without loading (or training) any weights."""
    if src.builtin:
        return builtin_model(src.builtin).arch
    if src.ckpt:
        # lazy: checkpoint.model imports torch; config validation imports this module
        from tip_megatron.checkpoint.model import read_arch

        return read_arch(src.ckpt)
    return ModelArch.from_hf_config(src.hf)


def load_source_weights(chunks, groups, arch: ModelArch, src: ModelSource) -> None:
    """Load the source's weights into this rank's chunks (collective over the world). A
    `ckpt` is verified first (its manifest's checksums, DCP's pickles: load_model_checkpoint)."""
    from tip_megatron.models.state import load_full_state_dict  # lazy: torch, as above

    if src.builtin:
        load_full_state_dict(chunks, builtin_model(src.builtin).full_state(groups), groups, arch)
    elif src.ckpt:
        from tip_megatron.checkpoint.model import load_model_checkpoint  # lazy: torch, as above

        load_model_checkpoint(chunks, groups, src.ckpt, expect_arch=arch)
    else:
        # lazy: the HF reader (safetensors, megatron) is needed only for an `hf` source
        from tip_megatron.checkpoint.hf.hf_io import HFCheckpoint
        from tip_megatron.checkpoint.hf.importer import LazyFullState  # lazy, as above

        ckpt = HFCheckpoint(src.hf)
        load_full_state_dict(chunks, LazyFullState(ckpt), groups, arch)
        ckpt.close()

"""Hugging Face checkpoint I/O: a lazy reader and a sharded safetensors writer.

Reading never loads a whole checkpoint: safetensors files are opened with `safe_open`
(memory-mapped; only the header is parsed up front) and each tensor is read when asked
for. Pickle checkpoints (`pytorch_model*.bin`) are refused unless `allow_pickle=True`;
then they are loaded with `torch.load(weights_only=True, mmap=True)`. Remote code is
never run: the config is read as JSON and only the llama/qwen2/qwen3 families are accepted.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tip_megatron.checkpoint.hf.mapping import IGNORED_HF_SUFFIXES, all_rules, expected_hf_shapes
from tip_megatron.models.arch import ModelArch

logger = logging.getLogger(__name__)

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"

#: config.json fields that mean the stored tensors are not plain weights.
_UNSUPPORTED_CONFIG_FIELDS = ("quantization_config",)

PathLike = Union[str, os.PathLike]


class HFCheckpoint:
    """A Hugging Face causal-LM directory (config.json + weights), read lazily.

        ckpt = HFCheckpoint(path)          # parses config + weight headers only
        ckpt.validate()                    # names and shapes against the config
        w = ckpt.get("model.norm.weight")  # reads one tensor
    """

    def __init__(self, path: PathLike, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory not found: {self.path}")
        self.config = _read_config(self.path)
        for key in _UNSUPPORTED_CONFIG_FIELDS:
            if self.config.get(key):
                raise ValueError(f"HF config field {key!r} is set: quantized checkpoints are not supported")
        self.arch = ModelArch.from_hf_config(self.config)
        self._file_of, self.is_pickle = _weight_files(self.path, allow_pickle)
        self._handles: dict[Path, object] = {}
        self._shapes = {name: self._shape_from_file(name) for name in self._file_of}

    # -------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a copy in memory; the file stays mapped)."""
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.path}")
        handle = self._open(self._file_of[name])
        if self.is_pickle:
            return handle[name].clone()
        return handle.get_tensor(name)

    def validate(self) -> None:
        """Every tensor the config implies is present with its shape, and nothing else.

        Raises ValueError naming the tensor. Tolerated: buffers derived from the config
        (`rotary_emb.inv_freq`) and, for tied embeddings, an `lm_head.weight` equal to the
        embedding (some exporters write both).
        """
        expected = expected_hf_shapes(self.arch)
        present = {n for n in self._file_of if not n.endswith(IGNORED_HF_SUFFIXES)}
        if self.arch.tie_word_embeddings and "lm_head.weight" in present:
            self._check_tied_lm_head()
            present.discard("lm_head.weight")
        missing = sorted(set(expected) - present)
        if missing:
            raise ValueError(f"HF checkpoint {self.path} is missing tensor(s) {_few(missing)} "
                             f"required by its config ({self.arch.family})")
        extra = sorted(present - set(expected))
        if extra:
            raise ValueError(f"HF checkpoint {self.path} has unexpected tensor(s) {_few(extra)} "
                             f"that a {self.arch.family} model with this config does not use")
        for name, shape in expected.items():
            if self._shapes[name] != shape:
                raise ValueError(f"HF tensor {name!r} has shape {list(self._shapes[name])}, "
                                 f"but the config implies {list(shape)}")

    def _check_tied_lm_head(self) -> None:
        if not torch.equal(self.get("lm_head.weight"), self.get("model.embed_tokens.weight")):
            raise ValueError(
                f"HF checkpoint {self.path}: config says tie_word_embeddings=true but lm_head.weight "
                "differs from model.embed_tokens.weight; fix tie_word_embeddings in config.json"
            )
        logger.info("ignoring lm_head.weight: equal to the tied embedding")

    # -------------------------------------------------------------- files
    def _open(self, file: Path):
        if file not in self._handles:
            if self.is_pickle:
                self._handles[file] = _torch_load(file)
            else:
                self._handles[file] = safe_open_named(file)
        return self._handles[file]

    def _shape_from_file(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._file_of[name])
        if self.is_pickle:
            if name not in handle:
                raise ValueError(f"tensor {name!r} listed in the index is not in {self._file_of[name]}")
            return tuple(handle[name].shape)
        try:
            return tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error type for a missing key
            raise ValueError(f"tensor {name!r} listed in the index is not in {self._file_of[name]}") from err

    def close(self) -> None:
        self._handles.clear()


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: an HF checkpoint needs its config.json")
    return _read_json(file)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file}: not valid JSON ({err}); it may be truncated or corrupt") from None


def _weight_files(path: Path, allow_pickle: bool) -> tuple[dict[str, Path], bool]:
    """Tensor name -> file, and whether the files are pickles."""
    if (path / SAFE_INDEX).is_file():
        return _from_index(path, SAFE_INDEX), False
    if (path / SAFE_SINGLE).is_file():
        return {name: path / SAFE_SINGLE for name in safe_open_named(path / SAFE_SINGLE).keys()}, False
    pickled = [n for n in (BIN_INDEX, BIN_SINGLE) if (path / n).is_file()]
    if not pickled:
        raise FileNotFoundError(f"no weights in {path}: expected {SAFE_SINGLE} or {SAFE_INDEX}")
    if not allow_pickle:
        raise ValueError(
            f"{path / pickled[0]} is a pickle checkpoint, and unpickling can run arbitrary code: "
            "refused. Pass allow_pickle=True (--allow-pickle) to load it with "
            "torch.load(weights_only=True), or convert it to safetensors first"
        )
    if pickled[0] == BIN_INDEX:
        return _from_index(path, BIN_INDEX), True
    return {name: path / BIN_SINGLE for name in _torch_load(path / BIN_SINGLE)}, True


def safe_open_named(file: Path):
    """safetensors' `safe_open`; a truncated or corrupt file is a ValueError naming it
    (safetensors checks at open that the header parses and covers the whole file)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); it may be truncated "
                         "or corrupt: download or export it again") from None


def _from_index(path: Path, index_name: str) -> dict[str, Path]:
    index = _read_json(path / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / index_name} has no 'weight_map'")
    files = {name: path / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {index_name} but does not exist")
    return files


def _torch_load(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict")
    return state


def _few(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------ writer
def parse_size(size: Union[int, str]) -> int:
    """'5GB' / '500MB' / '10KB' / 1234 -> bytes (decimal units, as HF uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


class ShardedSafetensorsWriter:
    """Writes tensors to HF-style safetensors shards as they arrive, in a planned order.

    Holds at most one shard's tensors in memory. One shard -> `model.safetensors`; more ->
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: PathLike, plan: list[list[str]]) -> None:
        self.out_dir = Path(out_dir)
        self.plan = plan
        self._shard_of = {name: k for k, names in enumerate(plan) for name in names}
        self._buffer: dict[str, torch.Tensor] = {}
        self._next = 0
        self._weight_map: dict[str, str] = {}
        self._total = 0

    def file_name(self, k: int) -> str:
        if len(self.plan) == 1:
            return SAFE_SINGLE
        return f"model-{k + 1:05d}-of-{len(self.plan):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise KeyError(f"tensor {name!r} is not in the shard plan")
        self._buffer[name] = tensor.contiguous()
        while self._next < len(self.plan) and all(n in self._buffer for n in self.plan[self._next]):
            self._flush(self._next)
            self._next += 1

    def _flush(self, k: int) -> None:
        tensors = {n: self._buffer.pop(n) for n in self.plan[k]}
        save_file(tensors, str(self.out_dir / self.file_name(k)), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self._weight_map[name] = self.file_name(k)
            self._total += tensor.numel() * tensor.element_size()

    def finish(self) -> None:
        if self._next != len(self.plan):
            missing = [n for names in self.plan[self._next:] for n in names if n not in self._buffer]
            raise RuntimeError(f"shards incomplete: tensors never written: {_few(missing)}")
        if len(self.plan) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def hf_tensor_order(arch: ModelArch) -> list[str]:
    """HF tensor names in the order a converter produces them (the shard plan's order)."""
    return [name for rule in all_rules(arch) for name in rule.hf]

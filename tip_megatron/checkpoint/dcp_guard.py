"""No code runs from a checkpoint: the pickles torch DCP reads, checked before it reads them.

torch distributed checkpointing (under megatron's dist_checkpointing) unpickles two things
with plain `pickle` / `torch.load(weights_only=False)`:
  - `<dir>/.metadata`, the DCP index (tensor shapes, chunks, file offsets);
  - every "bytes" item it lists (megatron's common state and `_extra_state` objects), a
    `torch.save` blob at an offset of a `*.distcp` file (`DefaultLoadPlanner.load_bytes`).
A crafted checkpoint could run any code through either. `check_dcp_dir(dir)` reads
`.metadata` with a restricted unpickler that resolves only the classes DCP's metadata is
made of (`ALLOWED`: torch.distributed.checkpoint metadata/planner/filesystem records,
torch.Size, dtypes, layouts, memory formats, paths, plain containers), then loads every bytes item
with `torch.load(weights_only=True)` (tensors and plain types only). Anything else is one
ValueError naming the file and what it refers to; nothing it names is ever called.
Every DCP read in checkpoint/ calls it first (once per directory and file version).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

#: DCP's index file in a dist_checkpointing directory.
METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint"
#: module -> names the metadata pickle may refer to (found in torch 2.13's DCP files; the
#: planner records appear because DCP stores the save plans' write items).
ALLOWED: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    f"{_DCP}.planner": frozenset({
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    # StorageMeta.checkpoint_id: DCP records the save path as given (a str, or a Path)
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "builtins": frozenset({"set", "frozenset", "slice", "complex", "bytearray"}),
}
#: torch module attributes that are plain values, not callables worth fearing.
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)

_checked: dict[str, tuple] = {}


class _Refused(pickle.UnpicklingError):
    """The pickle names something outside ALLOWED (its message: module.name)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED names (and torch dtypes / layouts / memory formats)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def load_metadata(path: str | os.PathLike) -> Any:
    """DCP's `.metadata` at `path`, unpickled by the restricted unpickler; a ValueError
    naming the file when it refers to anything else (nothing it names is called)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except _Refused as err:
        raise ValueError(
            f"{path}: refused: the pickle refers to {err}, which is not one of the classes torch "
            "DCP metadata holds (unpickling it could run code); do not load this checkpoint: "
            "re-save it, or take another step") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as err:
        raise ValueError(f"{path}: not readable as torch DCP metadata (damaged or truncated: "
                         f"{type(err).__name__}: {err}); re-save it, or take another step") from None


def check_dcp_dir(directory: str | os.PathLike) -> None:
    """Refuse (one ValueError naming the file) a dist_checkpointing directory whose pickles
    could run code or do not parse: `.metadata` and each bytes item it lists. Each file
    version (path, inode, size, mtime) is checked once per process."""
    directory = Path(directory)
    meta_path = directory / METADATA
    try:
        st = meta_path.stat()
    except OSError as err:
        raise ValueError(f"{meta_path}: missing ({err.strerror}): not a complete torch DCP "
                         "checkpoint directory") from None
    key = str(meta_path.absolute())
    version = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _checked.get(key) == version:
        return
    metadata = load_metadata(meta_path)
    _check_bytes_items(directory, metadata)
    _checked[key] = version


def _check_bytes_items(directory: Path, metadata: Any) -> None:
    # lazy: torch.distributed.checkpoint loads only when a DCP directory is checked
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    items = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise ValueError(f"{directory / METADATA}: not torch DCP metadata (no state_dict_metadata "
                         "/ storage_data); re-save it, or take another step")
    for index, info in storage.items():
        if not isinstance(items.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{directory / info.relative_path}: item {index.fqn!r} is stored with "
                             f"transforms {info.transform_descriptors}, which tip_megatron does not "
                             "write or check; refused")
        _check_bytes_item(directory / info.relative_path, index.fqn, info.offset, info.length)


def _check_bytes_item(path: Path, fqn: str, offset: int, length: int) -> None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        if len(blob) != length:
            raise EOFError(f"{len(blob)} of {length} bytes at offset {offset}")
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything but a clean plain load is refused
        raise ValueError(
            f"{path}: item {fqn!r} refused by torch.load(weights_only=True) (crafted or damaged; "
            f"torch DCP would unpickle it with weights_only=False): {load_error_reason(err)}; do "
            "not load this checkpoint: re-save it, or take another step") from None


def load_error_reason(err: BaseException) -> str:
    """The one line of a failed `torch.load(weights_only=True)` that says why (torch's own
    message is a page of advice, including to load with weights_only=False)."""
    text = str(err).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return text.splitlines()[0] if text else type(err).__name__

"""A training checkpoint's manifest: what was written at save, checked before a resume.

`MANIFEST.json` maps every file of the checkpoint (relative path) to its size and a CRC32:
of the whole file for small files (state.pt, rng/*.pt, config.yaml, arch.json,
dist/.metadata, dist/common.pt, ...), of the first and last MiB for large ones (the
dist/*.distcp shards). Trade-off: a resume must not read a multi-GB checkpoint twice, so
the shards get size + head/tail CRCs: that catches truncation, a missing or empty file,
and damage at either end (the usual result of a torn write or a full disk), not a flipped
bit in the middle of a shard (dist_checkpointing would then load wrong numbers; a full
hash would cost reading every byte at each resume).

`verify(dir)` returns the problems found (each naming the file); it also loads state.pt
and rng/*.pt with `torch.load(weights_only=True)`, which refuses any pickled object other
than tensors and plain containers, so a crafted file runs no code.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

from tip_megatron.checkpoint.layout import COMPLETE, MANIFEST

#: Files up to this size get a CRC of their whole content.
SMALL_FILE_BYTES = 4 << 20
#: Larger files: a CRC of this many bytes at each end.
EDGE_BYTES = 1 << 20
#: Replicated files loaded (weights_only=True) by `verify`.
TORCH_FILES = ("state.pt",)


def _crc(path: Path, size: int) -> str:
    """CRC32 (hex) of the file, or of its first and last EDGE_BYTES when it is large."""
    crc = 0
    with open(path, "rb") as f:
        if size <= SMALL_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                crc = zlib.crc32(block, crc)
        else:
            crc = zlib.crc32(f.read(EDGE_BYTES), crc)
            f.seek(size - EDGE_BYTES)
            crc = zlib.crc32(f.read(EDGE_BYTES), crc)
    return f"{crc:08x}"


def _files(root: Path) -> list[Path]:
    skip = {MANIFEST, COMPLETE}
    out = []
    for dirpath, _, names in os.walk(root):
        out += [Path(dirpath) / n for n in names if not (Path(dirpath) == root and n in skip)]
    return sorted(out)


def write_manifest(root: Path) -> dict:
    """Record every file under `root` (call once all ranks have written and closed theirs)."""
    entries = {}
    for path in _files(root):
        size = path.stat().st_size
        entries[str(path.relative_to(root))] = {"size": size, "crc32": _crc(path, size),
                                                "crc_of": "all" if size <= SMALL_FILE_BYTES else "ends"}
    manifest = {"version": 1, "files": entries}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify(root: Path) -> list[str]:
    """Problems of the checkpoint at `root` (empty: it looks as it was saved), each one
    naming the file. A checkpoint saved before manifests existed is checked for
    loadability only."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        return [f"{root / COMPLETE}: missing (the save did not finish)"]
    problems = []
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            return [f"{manifest_path}: unreadable ({err})"]
        problems += _check_files(root, files)
    if not problems:
        problems += _check_loadable(root)
    return problems


def _check_files(root: Path, files: dict) -> list[str]:
    problems = []
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, {entry['size']} at save (truncated or rewritten)")
        elif _crc(path, size) != entry["crc32"]:
            problems.append(f"{path}: content differs from the save (CRC32 mismatch)")
    return problems


def _check_loadable(root: Path) -> list[str]:
    paths = [root / n for n in TORCH_FILES] + sorted((root / "rng").glob("rank_*.pt"))
    problems = []
    for path in paths:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: not loadable
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"{path}: not loadable with torch.load(weights_only=True) (damaged, "
                            f"crafted, or written before checkpoints held plain types): {first}")
    return problems

"""A checkpoint's manifest: what was written at save, checked by every reader.

`MANIFEST.json` maps every file of a checkpoint (relative path) to its size and a digest:

    {"version": 2, "hash": "crc32", "mode": "full",
     "files": {"dist/__0_0.distcp": {"size": 1631673, "digest": "9a0c...", "of": "all"}, ...}}

Modes (`checkpoint.verify`):
  full   (default) a streaming hash of every whole file (read in 8 MiB blocks): any
         changed byte anywhere is caught; a save and a verification each read the whole
         checkpoint once more (tools/bench_checkpoint_hash.py measures the cost per GiB).
  edges  whole files up to 4 MiB; larger ones (the dist/*.distcp shards) get their size
         and a digest of their first and last MiB: catches truncation, a missing or empty
         file and damage at either end (torn writes, a full disk), NOT a flipped byte in the
         middle of a shard. Cheap: ~2 MiB read per shard.

`verify(dir)` (a training step) and `verify_files(dir)` (any checkpoint) return the
problems found, each naming the file. Beyond the digests they load state.pt / rng/*.pt with
`torch.load(weights_only=True)` (a crafted pickle runs no code) and check the DCP pickles
(`checkpoint.dcp_guard`). A checkpoint without full digests (saved before manifests held
them, or with mode edges) verifies what it can and logs one warning saying so.
The manifest is not a signature: whoever can write the files can rewrite it too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from tip_megatron.checkpoint import dcp_guard
from tip_megatron.checkpoint.layout import COMPLETE, MANIFEST

logger = logging.getLogger(__name__)

VERSION = 2
MODES = ("full", "edges")
#: Files up to this size get a digest of their whole content in mode `edges`.
SMALL_FILE_BYTES = 4 << 20
#: Larger files in mode `edges`: a digest of this many bytes at each end.
EDGE_BYTES = 1 << 20
#: Read size of the streaming hash (4-8 MiB blocks keep the per-call overhead negligible).
BLOCK_BYTES = 8 << 20
#: Files hashed at once (zlib and hashlib release the GIL on large blocks).
WORKERS = 4
#: Replicated files of a training step loaded (weights_only=True) by `verify`.
TORCH_FILES = ("state.pt",)
#: Weight directories of the two checkpoint kinds (DCP pickles checked by `dcp_guard`).
DCP_DIRS = ("dist", "model")


class _Crc32:
    """hashlib-like streaming CRC32 (zlib's, hex)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, block) -> None:
        self.value = zlib.crc32(block, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


#: Streaming hashes by name; the default `HASH` was chosen by measured speed
#: (tools/bench_checkpoint_hash.py; docs/checkpoints.md has the figures). Integrity against
#: accidental damage only: any of them catches a flipped byte (CRC32: every burst up to 32
#: bits, random damage with probability 1 - 2^-32).
HASHES: dict[str, Callable[[], object]] = {
    "crc32": _Crc32,
    "blake2b": lambda: hashlib.blake2b(digest_size=16),
    "sha256": hashlib.sha256,
}
HASH = "crc32"


def file_digest(path: Path, *, algorithm: str = HASH, edges: bool = False) -> str:
    """Digest (hex) of the whole file, streamed in BLOCK_BYTES blocks; with `edges`, of its
    first and last EDGE_BYTES only (callers pass it for files over SMALL_FILE_BYTES)."""
    h = HASHES[algorithm]()
    with open(path, "rb") as f:
        if edges:
            h.update(f.read(EDGE_BYTES))
            f.seek(-EDGE_BYTES, os.SEEK_END)
            h.update(f.read(EDGE_BYTES))
        else:
            for block in iter(lambda: f.read(BLOCK_BYTES), b""):
                h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    skip = {MANIFEST, COMPLETE}
    out = []
    for dirpath, _, names in os.walk(root):
        out += [Path(dirpath) / n for n in names if not (Path(dirpath) == root and n in skip)]
    return sorted(out)


def _entry(path: Path, mode: str) -> dict:
    size = path.stat().st_size
    edges = mode == "edges" and size > SMALL_FILE_BYTES
    return {"size": size, "digest": file_digest(path, edges=edges), "of": "ends" if edges else "all"}


def write_manifest(root: Path, mode: str = "full") -> dict:
    """Record every file under `root` (call once every writer has closed its files)."""
    if mode not in MODES:
        raise ValueError(f"checkpoint.verify={mode!r}: accepted: {list(MODES)}")
    root = Path(root)
    paths = _files(root)
    with ThreadPoolExecutor(WORKERS) as pool:
        entries = list(pool.map(lambda p: _entry(p, mode), paths))
    files = {str(p.relative_to(root)): e for p, e in zip(paths, entries)}
    manifest = {"version": VERSION, "hash": HASH, "mode": mode, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify(root: Path) -> list[str]:
    """Problems of the training step at `root` (empty: it is as it was saved), each one
    naming the file: its COMPLETE marker, then `verify_files`."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        return [f"{root / COMPLETE}: missing (the save did not finish)"]
    return verify_files(root, torch_files=True)


def verify_files(root: Path, *, torch_files: bool = False) -> list[str]:
    """Problems of the checkpoint at `root` against its MANIFEST.json, then its pickles:
    DCP's (`dcp_guard`) and, with `torch_files`, state.pt / rng/*.pt (weights_only=True).
    A checkpoint without full digests is checked as far as its manifest goes, with a
    warning (`coverage_warning`)."""
    root = Path(root)
    manifest_path = root / MANIFEST
    files, algorithm = None, "crc32"
    if manifest_path.is_file():
        try:
            data = json.loads(manifest_path.read_text())
            files, algorithm = data["files"], data.get("hash", "crc32")
            if algorithm not in HASHES:
                return [f"{manifest_path}: hash {algorithm!r} unknown; accepted: {sorted(HASHES)}"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{manifest_path}: unreadable ({err})"]
    problems = _check_files(root, files, algorithm) if files is not None else []
    if problems:
        return problems
    warning = coverage_warning(root, files)
    if warning:
        logger.warning(warning)
    problems += _check_pickles(root)
    if torch_files:
        problems += _check_loadable(root)
    return problems


def coverage_warning(root: Path, files: Optional[dict]) -> str:
    """'' when every file has a whole-file digest; else a warning naming what is not covered."""
    if files is None:
        return (f"checkpoint {root} has no {MANIFEST} (saved before checkpoints recorded one): "
                "damage inside its files cannot be detected; re-save it to get full checksums")
    partial = sorted(rel for rel, e in files.items() if _covered(e) != "all")
    if not partial:
        return ""
    return (f"checkpoint {root}: {len(partial)} file(s) ({partial[0]}{', ...' if len(partial) > 1 else ''}) "
            "have checksums of their first and last MiB only (checkpoint.verify=edges, or saved "
            "before full checksums): a damaged byte in the middle goes unnoticed; re-save with "
            "checkpoint.verify=full to cover them")


def _covered(entry: dict) -> str:
    return entry.get("of", entry.get("crc_of", "all"))  # version 1 wrote crc_of


def _check_files(root: Path, files: dict, algorithm: str) -> list[str]:
    with ThreadPoolExecutor(WORKERS) as pool:
        found = pool.map(lambda item: _check_file(root / item[0], item[1], algorithm), sorted(files.items()))
        return [p for p in found if p]


def _check_file(path: Path, entry: dict, algorithm: str) -> str:
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes, {entry['size']} at save (truncated or rewritten)"
    recorded = entry.get("digest", entry.get("crc32"))  # version 1 wrote crc32
    if file_digest(path, algorithm=algorithm, edges=_covered(entry) == "ends") != recorded:
        return f"{path}: content differs from the save ({algorithm} mismatch: damaged on disk or in transfer)"
    return ""


def _check_pickles(root: Path) -> list[str]:
    problems = []
    for name in DCP_DIRS:
        if (root / name / dcp_guard.METADATA).is_file():
            try:
                dcp_guard.check_dcp_dir(root / name)
            except ValueError as err:
                problems.append(str(err))
    return problems


def _check_loadable(root: Path) -> list[str]:
    paths = [root / n for n in TORCH_FILES] + sorted((root / "rng").glob("rank_*.pt"))
    problems = []
    for path in paths:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: not loadable
            problems.append(f"{path}: not loadable with torch.load(weights_only=True) (damaged, "
                            "crafted, or written before checkpoints held plain types): "
                            f"{dcp_guard.load_error_reason(err)}")
    return problems


def check_checkpoint(root: Path, *, training: bool) -> None:
    """One ValueError naming every damaged file of the checkpoint at `root` (a training step
    with `training`, else a model checkpoint) and what to do; nothing when it verifies."""
    problems = verify(root) if training else verify_files(root)
    if not problems:
        return
    advice = ("pick another step (an older step_* of the run) or re-save this one" if training else
              "re-create it (tip-megatron convert hf-to-mcore ... --overwrite) or copy it again "
              "from where it was saved")
    raise ValueError(f"checkpoint {root} does not verify: {'; '.join(problems)}; {advice}")


def check_checkpoint_collective(root: Path, *, training: bool) -> None:
    """`check_checkpoint` of a checkpoint every rank is about to load: rank 0 reads and
    hashes its files, every rank raises the same ValueError (collective over the world when
    torch.distributed is initialized with more than one rank)."""
    world = dist.is_initialized() and dist.get_world_size() > 1
    box: list = [None]
    if not world or dist.get_rank() == 0:
        try:
            check_checkpoint(root, training=training)
        except ValueError as err:
            box[0] = str(err)
    if world:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ValueError(box[0])

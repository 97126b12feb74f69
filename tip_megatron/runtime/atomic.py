"""Atomic directory writes: build beside the target, fsync, rename into place.

    with atomic_dir(out, group=dist.group.WORLD, subdirs=("model",)) as tmp:
        ...every rank of `group` writes its files under tmp...
    # here `out` is the new, complete directory

The one writer of every directory tip_megatron produces (model checkpoints, training
checkpoints, HF exports). What it guarantees:
- The directory is built as `.<name>.tmp-<nonce>` beside the target (same filesystem, so
  the final rename is atomic). A write that fails or is killed leaves only that temp
  directory; the next write of the same target removes it (`stale` widens that clean-up).
- Before the target name points at the new data, its files and directories are fsynced
  (by rank 0 of the group and the first rank of every node: a rank on another node may
  have written files through its own page cache).
- An existing target stays valid until the new one is complete: the two are swapped in
  one `renameat2(RENAME_EXCHANGE)`, then the old one is deleted. Where the filesystem
  cannot exchange (e.g. NFS), the old directory is first renamed to `.<name>.old-<nonce>`;
  a crash between the two renames leaves it there, and the next write puts it back first.
  A target that is a symlink is replaced by the new directory; the link goes, the directory
  it pointed to is left as it was.
- Collective when `group` is given: rank 0 of the group creates, renames and cleans up;
  barriers keep the other ranks from writing too early or returning too soon.

`check_replaceable(out, sources=...)` is what an `--overwrite` may replace: nothing that
resolves to (or contains, or lies inside) a source, and no non-empty directory without the
`WRITTEN_BY` marker that the converters write (a user's folder is never deleted).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch.distributed as dist

from tip_megatron.runtime.env import rank_env

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Marker file in every directory the converters write: `--overwrite` replaces only those.
WRITTEN_BY = ".written_by_tip_megatron"


def write_marker(directory: Path, kind: str) -> None:
    (Path(directory) / WRITTEN_BY).write_text(f"{kind}\n")


def check_replaceable(
    target: str | os.PathLike, *, overwrite: bool, sources: Sequence[str | os.PathLike] = (),
    option: str = "--out", legacy_ours: Optional[Callable[[Path], bool]] = None,
) -> None:
    """Raise (one line naming the path) unless `target` may be written: a new path, or with
    `overwrite` a directory this tool wrote (the `WRITTEN_BY` marker, or one of the files
    `also_ours` that mark older outputs) or an empty one; never a path that is, contains
    or lies inside one of `sources` (compared resolved: symlinks and relative paths)."""
    out = Path(target).resolve()
    for src in sources:
        s = Path(src).resolve()
        if out == s or s.is_relative_to(out) or out.is_relative_to(s):
            raise ValueError(f"{option} {target} is the source {src} or overlaps it (resolved: {out} "
                             f"vs {s}); accepted: an output path outside the source")
    if not out.exists() and not Path(target).is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"output {target} exists; pass overwrite (--overwrite) to replace it")
    if not out.is_dir():
        raise ValueError(f"{option} {target} is a file, not a directory this tool wrote: refused "
                         "(delete it yourself or pick another path)")
    ours = (out / WRITTEN_BY).is_file() or (legacy_ours is not None and legacy_ours(out))
    if not ours and any(out.iterdir()):
        raise ValueError(f"{option} {target} is not a directory tip_megatron wrote (no {WRITTEN_BY} "
                         "marker) and holds files: refused; accepted: a new path, an empty "
                         "directory, or an output of tip-megatron convert")


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike, *, group: Optional[Any] = None, subdirs: Sequence[str] = (),
    stale: Sequence[str] = (),
) -> Iterator[Path]:
    """Yield an empty temp directory (with `subdirs`) that replaces `target` on exit.

    group: None = this process alone; a process group = every member calls this (a
    collective) and writes into the same temp directory.
    stale: extra glob patterns (beside the target) of leftovers to remove first, e.g.
    other steps' temp directories.
    On an exception nothing is renamed and the temp directory stays for the next write to
    remove (other ranks may still be writing into it).
    """
    final = Path(target).absolute()
    nonce = _shared_nonce(group)
    tmp = final.parent / f".{final.name}.tmp-{nonce}"
    if _is_leader(group):
        final.parent.mkdir(parents=True, exist_ok=True)
        _recover_or_clean(final, stale)
        tmp.mkdir()
        for name in subdirs:
            (tmp / name).mkdir(parents=True)
    _barrier(group)
    yield tmp
    _barrier(group)  # every rank has written and closed its files
    if _is_leader(group) or (group is not None and rank_env().local_rank == 0):
        fsync_tree(tmp)
    _barrier(group)
    if _is_leader(group):
        replace_dir(tmp, final, nonce)
    _barrier(group)


def replace_dir(tmp: Path, final: Path, nonce: str = "") -> None:
    """Move the complete directory `tmp` to `final`; an existing `final` stays valid until
    then and is deleted afterwards."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
    elif _exchange(tmp, final):
        fsync_dir(final.parent)
        _remove(tmp)  # now the previous directory
    else:
        old = final.parent / f".{final.name}.old-{nonce or uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _remove(old)


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Delete a replaced directory; a symlink is unlinked, never followed (rmtree refuses
    a link, and what it points to is not ours)."""
    if path.is_symlink():
        try:
            path.unlink()
        except OSError:
            if not ignore_errors:
                raise
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first) under `root`."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not supported."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _recover_or_clean(final: Path, stale: Sequence[str]) -> None:
    """Put back a previous directory a crash left mid-swap; remove leftover temps."""
    olds = sorted(final.parent.glob(f".{final.name}.old-*"))
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    for path in olds + list(final.parent.glob(f".{final.name}.tmp-*")):
        _remove(path, ignore_errors=True)
    for pattern in stale:
        for path in final.parent.glob(pattern):
            _remove(path, ignore_errors=True)


def _shared_nonce(group: Optional[Any]) -> str:
    nonce = [uuid.uuid4().hex[:8]]
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast_object_list(nonce, group=group, group_src=0)
    return nonce[0]


def _is_leader(group: Optional[Any]) -> bool:
    return group is None or dist.get_rank(group) == 0


def _barrier(group: Optional[Any]) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)

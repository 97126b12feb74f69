"""io_atomic.atomic_dir: the one directory writer of checkpoints and exports."""
import threading

import pytest

from tip_megatron.runtime import atomic as io_atomic
from tip_megatron.runtime.env import rank_env
from tip_megatron.runtime.processes import run_forked
from tip_megatron.runtime.atomic import atomic_dir


def _write(target, text, **kwargs):
    with atomic_dir(target, **kwargs) as tmp:
        assert tmp.parent == target.parent.absolute() and tmp.name.startswith(f".{target.name}.tmp-")
        (tmp / "sub").mkdir(exist_ok=True)
        (tmp / "sub" / "data.txt").write_text(text)
        (tmp / "COMPLETE").write_text(text)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["exchange", "two_renames"])
def swap(request, monkeypatch):
    """Both ways of replacing an existing directory: renameat2(RENAME_EXCHANGE), and the
    two renames through `.old` used where a filesystem cannot exchange."""
    if request.param == "two_renames":
        monkeypatch.setattr(io_atomic, "_exchange", lambda a, b: False)
    return request.param


def test_new_and_replaced_directories(tmp_path, swap):
    target = tmp_path / "out" / "ckpt"
    _write(target, "one")
    assert (target / "sub" / "data.txt").read_text() == "one"
    _write(target, "two", subdirs=("sub",))
    assert (target / "sub" / "data.txt").read_text() == "two"
    assert sorted(p.name for p in target.iterdir()) == ["COMPLETE", "sub"]
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_directory(tmp_path, swap):
    target = tmp_path / "ckpt"
    _write(target, "good")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "COMPLETE").write_text("half")
            raise OSError("disk full")
    assert (target / "COMPLETE").read_text() == "good"
    assert len(_leftovers(tmp_path)) == 1  # the temp dir, for the next write to remove
    _write(target, "next")
    assert (target / "COMPLETE").read_text() == "next" and _leftovers(tmp_path) == []


def test_a_symlinked_target_is_replaced_and_its_directory_left_alone(tmp_path, swap):
    """Before: the swap succeeded, then rmtree refused the old entry (a symlink): the write
    raised although the new directory was in place, and a `.tmp-` link stayed behind."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "COMPLETE").write_text("theirs")
    target = tmp_path / "ckpt"
    target.symlink_to(tmp_path / "elsewhere")
    _write(target, "new")
    assert not target.is_symlink() and (target / "COMPLETE").read_text() == "new"
    assert (tmp_path / "elsewhere" / "COMPLETE").read_text() == "theirs"
    assert _leftovers(tmp_path) == []


def test_a_crash_between_the_two_renames_is_undone(tmp_path):
    """Only the old directory exists (renamed aside, the new one never moved in): the next
    write puts it back before anything else, so a failure then leaves it in place."""
    target = tmp_path / "ckpt"
    _write(target, "good")
    target.rename(tmp_path / ".ckpt.old-deadbeef")
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("killed")
    assert (target / "COMPLETE").read_text() == "good"


def test_stale_patterns_are_removed(tmp_path):
    (tmp_path / ".step_000001.tmp-0000").mkdir()
    (tmp_path / "keep").mkdir()
    _write(tmp_path / "step_000002", "x", stale=(".step_*.tmp-*",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "step_000002"]


def test_readers_never_see_the_target_missing(tmp_path):
    """A reader polling the target while it is replaced 40 times always finds a complete
    directory (with RENAME_EXCHANGE there is no moment without one)."""
    target = tmp_path / "ckpt"
    _write(target, "0")
    errors, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                (target / "COMPLETE").read_text()
            except OSError as err:
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 41):
            _write(target, str(i))
    finally:
        done.set()
        reader.join()
    assert errors == [] and (target / "COMPLETE").read_text() == "40"


def _ranks_write(target):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = rank_env().rank
    with atomic_dir(target, group=dist.group.WORLD, subdirs=("ranks",)) as tmp:
        (tmp / "ranks" / f"{rank}.txt").write_text(str(rank))
    return sorted(p.name for p in (target / "ranks").iterdir())


def test_every_rank_writes_into_one_directory(tmp_path):
    target = tmp_path / "ckpt"
    _write(target, "old")
    results = run_forked(_ranks_write, 3, args=(target,), timeout_s=120)
    assert results == [["0.txt", "1.txt", "2.txt"]] * 3  # renamed before any rank returns
    assert not (target / "COMPLETE").exists() and _leftovers(tmp_path) == []

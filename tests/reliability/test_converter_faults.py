"""Converter safety: `--overwrite` replaces only a directory tip_megatron wrote, never the
source (also through a symlink or a relative path), by swapping a complete new directory
in; truncated or corrupt safetensors name the file; killing the command stops its ranks.
Integrity: a converted checkpoint carries a full manifest; `mcore-to-hf` and `generate
--ckpt` refuse a damaged one (a byte flipped mid-shard, a truncated shard) naming the file,
and a pickle payload in DCP's `.metadata` without running it; an absurd weight stops an
export of a checkpoint whose checksums cannot see it."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from _reliability_assets import tree_hashes
from tip_megatron.apps import cli
from tip_megatron.checkpoint import dcp_guard, manifest
from tip_megatron.checkpoint.layout import MANIFEST
from tip_megatron.testing.assets import char_spm_model, write_jsonl
from tip_megatron.runtime.atomic import WRITTEN_BY
from tip_megatron.checkpoint.model import is_model_checkpoint
from tip_megatron.testing.hf_models import tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_hf_model("llama").save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """A model checkpoint and its HF export, both written by the converters."""
    root = tmp_path_factory.mktemp("conv")
    assert cli.main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(root / "ck")]) == 0
    assert cli.main(["convert", "mcore-to-hf", "--ckpt", str(root / "ck"), "--out", str(root / "hf")]) == 0
    return root


def _convert(capsys, *argv):
    capsys.readouterr()  # drop what came before (HF's save progress bars)
    rc = cli.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _foreign(tmp_path):
    folder = tmp_path / "my_files"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "results.csv").write_text("1,2,3\n")
    return folder


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_overwrite_refuses_a_foreign_folder(hf_dir, converted, tmp_path, capsys, direction):
    folder = _foreign(tmp_path)
    before = tree_hashes(folder)
    src = ["--hf", hf_dir] if direction == "hf-to-mcore" else ["--ckpt", converted / "ck"]
    rc, err = _convert(capsys, direction, *src, "--out", folder, "--overwrite")
    assert rc == 2 and len(err) == 1, err
    assert str(folder) in err[0] and "not a directory tip_megatron wrote" in err[0]
    assert "accepted: a new path, an empty directory, or an output of tip-megatron convert" in err[0]
    assert tree_hashes(folder) == before


def test_overwrite_refuses_the_source_however_named(hf_dir, converted, tmp_path, capsys):
    link = tmp_path / "link_to_source"
    link.symlink_to(hf_dir)
    relative = os.path.relpath(hf_dir / ".." / hf_dir.name)
    before = tree_hashes(hf_dir)
    cases = [("hf-to-mcore", "--hf", hf_dir, hf_dir), ("hf-to-mcore", "--hf", hf_dir, link),
             ("hf-to-mcore", "--hf", hf_dir, relative), ("hf-to-mcore", "--hf", hf_dir, hf_dir.parent),
             ("mcore-to-hf", "--ckpt", converted / "ck", converted / "ck" / "..")]
    for direction, flag, src, out in cases:
        rc, err = _convert(capsys, direction, flag, src, "--out", out, "--overwrite")
        assert rc == 2 and len(err) == 1, (out, err)
        assert f"--out {out} is the source" in err[0] and "accepted: an output path outside the source" in err[0]
    assert tree_hashes(hf_dir) == before
    assert is_model_checkpoint(converted / "ck")


def test_overwrite_replaces_our_own_outputs(hf_dir, converted, capsys):
    for out in (converted / "ck", converted / "hf"):
        assert (out / WRITTEN_BY).is_file()
    (converted / "hf" / "stale.bin").write_text("from an older export")
    rc, _ = _convert(capsys, "mcore-to-hf", "--ckpt", converted / "ck", "--out", converted / "hf", "--overwrite")
    assert rc == 0 and not (converted / "hf" / "stale.bin").exists()
    rc, _ = _convert(capsys, "hf-to-mcore", "--hf", hf_dir, "--out", converted / "ck", "--overwrite")
    assert rc == 0 and is_model_checkpoint(converted / "ck")


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path, capsys):
    single = tmp_path / "single"
    tiny_hf_model("llama").save_pretrained(single, safe_serialization=True)
    weights = single / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    rc, err = _convert(capsys, "hf-to-mcore", "--hf", single, "--out", tmp_path / "out1")
    assert rc == 2 and len(err) == 1 and str(weights) in err[0] and "truncated or corrupt" in err[0], err
    sharded = tmp_path / "sharded"
    tiny_hf_model("llama").save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    rc, err = _convert(capsys, "hf-to-mcore", "--hf", sharded, "--out", tmp_path / "out2")
    assert rc == 2 and len(err) == 1 and str(shards[1]) in err[0], err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _start_and_wait_for(cmd, when):
    """Start the conversion in a session of its own and wait for the kill point: its two
    ranks running, or (before_fork) the writer queue's manager serving (a listening socket)
    with no rank forked yet. Returns (proc, its processes then), or None when the ranks
    came first (the second window is a fraction of a second on a loaded machine)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]),
                                     PYTHONFAULTHANDLER="1"), start_new_session=True)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        # forked ranks share the parent's command line; the manager (and the resource
        # tracker) are multiprocessing's own interpreters, started before the fork
        children = parent.children()
        ranks = [c for c in children if _cmdline(c) == parent.cmdline()]
        if when == "ranks_running" and len(ranks) >= 2:
            return proc, parent.children(recursive=True)
        managers = _managers(children)
        if when == "before_fork" and ranks and any(r.pid > m.pid for r in ranks for m in managers):
            proc.send_signal(signal.SIGTERM)  # missed: end this one cleanly, try again
            proc.wait(timeout=60)
            return None
        if when == "before_fork" and not ranks and any(_serving(m) for m in managers):
            return proc, parent.children(recursive=True)
        time.sleep(0.005)
    pytest.fail("conversion ended before the kill point: " + (proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"))


def _managers(children):
    return [c for c in children if "--multiprocessing-fork" in _cmdline(c)]


def _serving(proc) -> bool:
    import psutil

    try:
        return bool(proc.net_connections(kind="unix"))
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("when", ["ranks_running", "before_fork"])
def test_killing_convert_stops_its_ranks_and_keeps_the_old_output(hf_dir, converted, tmp_path, when):
    """SIGTERM to `convert hf-to-mcore --tp 2` while its ranks run, or before they are
    forked (in `preload_for_fork`: the writer queue's spawned manager serving, its resource
    tracker running): the command exits through its clean-up (128 + SIGTERM), every
    process it started and every process of its session is gone within seconds, and
    --out is the previous checkpoint, unchanged."""
    import psutil

    out = converted / "ck"
    before = tree_hashes(out)
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "convert", "hf-to-mcore", "--hf", str(hf_dir),
           "--out", str(out), "--tp", "2", "--overwrite"]
    for _ in range(3):
        started = _start_and_wait_for(cmd, when)
        if started:
            break
    else:
        pytest.fail("the ranks were forked before the kill point in 3 tries")
    proc, family = started
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # where it hangs (faulthandler), then clean up
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=10)
        for p in family:
            if p.is_running():
                p.kill()
        pytest.fail(f"still running 30 s after SIGTERM:\n{proc.stderr.read()[-4000:]}")
    gone, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, [(p.pid, _cmdline(p)) for p in alive]
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    session = [p.pid for p in psutil.process_iter() if _sid(p.pid) == proc.pid]
    assert not session, [(pid, _cmdline(psutil.Process(pid))) for pid in session]
    assert tree_hashes(out) == before


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


# ------------------------------------------------------------------ integrity of what is read
def _copy_ckpt(converted, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(converted / "ck", ck)
    return ck


def _shard(ck):
    return max((ck / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_middle(ck):
    shard = _shard(ck)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_metadata_payload(dcp_dir, marker):
    """A real DCP index with a payload in it, and a manifest rewritten to match (an attacker
    can rewrite both): only the restricted unpickler stands in the way."""
    meta = dcp_dir / dcp_guard.METADATA
    index = dcp_guard.load_metadata(meta)
    index.storage_meta = _Payload(str(marker))
    meta.write_bytes(pickle.dumps(index))
    manifest.write_manifest(dcp_dir.parent)
    return meta


def test_conversion_writes_a_full_manifest_that_verifies(converted):
    ck = converted / "ck"
    recorded = json.loads((ck / MANIFEST).read_text())
    assert (recorded["version"], recorded["hash"], recorded["mode"]) == (2, "crc32", "full")
    on_disk = {str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(recorded["files"]) == on_disk
    for rel, entry in recorded["files"].items():  # an independent CRC32 of each whole file
        data = (ck / rel).read_bytes()
        assert entry == {"size": len(data), "digest": f"{zlib.crc32(data):08x}", "of": "all"}, rel
    assert manifest.verify_files(ck) == []


def _export_fails(capsys, ck, out, *extra):
    rc, err = _convert(capsys, "mcore-to-hf", "--ckpt", ck, "--out", out, *extra)
    errors = [line for line in err if "error:" in line]
    assert rc == 2 and len(errors) == 1 and err[-1] == errors[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return errors[0]


def test_mcore_to_hf_refuses_a_byte_flipped_in_the_middle_of_a_shard(converted, tmp_path, capsys):
    ck = _copy_ckpt(converted, tmp_path)
    shard = _flip_middle(ck)
    before = tree_hashes(ck)
    line = _export_fails(capsys, ck, tmp_path / "hf")
    assert f"{shard}: content differs from the save (crc32 mismatch" in line
    assert "re-create it (tip-megatron convert hf-to-mcore ... --overwrite)" in line
    assert tree_hashes(ck) == before


def _blow_up_first_embedding_value(hf_dir, ck) -> float:
    """Set the exponent's top bit of embedding[0, 0] in the shard (a one-bit flip), as the
    issue saw: a weight of ~1e37. Returns the new value."""
    from safetensors.torch import load_file

    value = load_file(hf_dir / "model.safetensors")["model.embed_tokens.weight"][0, 0]
    raw = value.numpy().tobytes()
    shard = _shard(ck)
    data = bytearray(shard.read_bytes())
    assert data.count(raw) == 1
    at = data.index(raw)
    data[at + 3] |= 0x40
    shard.write_bytes(bytes(data))
    import numpy as np

    return float(np.frombuffer(bytes(data[at:at + 4]), dtype=np.float32)[0])


def test_export_stops_at_an_absurd_weight_its_checksums_cannot_see(hf_dir, converted, tmp_path, capsys,
                                                                   caplog):
    """A checkpoint without a manifest (saved before they existed) with a flipped exponent
    bit: read with a warning, then the bound stops the export (--max-abs-weight 0 lifts it)."""
    ck = _copy_ckpt(converted, tmp_path)
    (ck / MANIFEST).unlink()
    big = _blow_up_first_embedding_value(hf_dir, ck)
    assert 1e30 < abs(big) < 3e38
    line = _export_fails(capsys, ck, tmp_path / "hf")
    assert "tensor 'embedding.word_embeddings.weight' holds |w| = " in line
    assert "> --max-abs-weight 10000" in line and "export an earlier step" in line
    rc, err = _convert(capsys, "mcore-to-hf", "--ckpt", ck, "--out", tmp_path / "hf", "--max-abs-weight", "0")
    assert rc == 0, err
    assert any("has no MANIFEST.json" in r.getMessage() for r in caplog.records)
    from safetensors.torch import load_file

    assert load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"][0, 0] == big


def test_a_pickle_payload_in_dcp_metadata_never_runs(converted, tmp_path, capsys):
    ck = _copy_ckpt(converted, tmp_path)
    marker = tmp_path / "payload_ran"
    meta = _plant_metadata_payload(ck / "model", marker)
    before = tree_hashes(ck)
    line = _export_fails(capsys, ck, tmp_path / "hf")
    assert f"{meta}: refused: the pickle refers to " in line and "could run code" in line
    assert not marker.exists(), "the payload ran"
    rc, err = _generate(ck, tmp_path)
    assert rc == 2 and len(err) == 1 and f"{meta}: refused" in err[0], err
    assert not marker.exists(), "the payload ran"
    assert tree_hashes(ck) == before


@pytest.mark.slow
def test_generate_names_a_truncated_shard(converted, tmp_path):
    ck = _copy_ckpt(converted, tmp_path)
    shard = _shard(ck)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, err = _generate(ck, tmp_path)
    assert rc == 2 and len(err) == 1 and f"{shard}: " in err[0] and "truncated" in err[0], err


def _generate(ck, tmp_path):
    """`tip-megatron generate --ckpt CK` as a user types it: (exit code, its error lines)."""
    char_spm_model(tmp_path / "tok.model", "0123456789+= ")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2="}])
    out = tmp_path / "samples.jsonl"
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "generate", "--ckpt", str(ck), "--prompts",
           str(tmp_path / "p.jsonl"), "--out", str(out), "--tokenizer", str(tmp_path / "tok.model"),
           "--max-new-tokens", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert not out.exists()
    return done.returncode, [line for line in done.stderr.splitlines() if "error:" in line]


@pytest.mark.slow
def test_every_rank_of_a_generate_world_refuses_a_damaged_checkpoint(converted, tmp_path):
    """Two ranks (DP=2): rank 0 hashes, both get the verdict (a broadcast) and exit 2;
    none waits for the other at a collective."""
    from tip_megatron.testing.assets import cli_main
    from tip_megatron.testing.distributed import run_distributed

    ck = _copy_ckpt(converted, tmp_path)
    _flip_middle(ck)
    char_spm_model(tmp_path / "tok.model", "0123456789+= ")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2="}, {"prompt": "3+4="}])
    argv = ["generate", "--ckpt", str(ck), "--prompts", str(tmp_path / "p.jsonl"), "--out",
            str(tmp_path / "s.jsonl"), "--tokenizer", str(tmp_path / "tok.model"), "--max-new-tokens", "2"]
    assert run_distributed(cli_main, 2, args=(argv,)) == [2, 2]
    assert not (tmp_path / "s.jsonl").exists()

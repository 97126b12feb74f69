"""Damaged training checkpoints: resume=auto falls back to the newest good one (warning
naming the bad file, the damaged one renamed, never deleted); an explicit damaged
resume=PATH is an error naming the file; a byte flipped in the middle of a shard is caught
(full-file checksums); a pickle payload in state.pt or in DCP's dist/.metadata is refused
without running; state.pt / rng files are plain (weights_only=True)."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from _reliability_assets import make_assets, overrides, train_capturing, tree_hashes
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.checkpoint import dcp_guard, manifest
from tip_megatron.checkpoint.layout import COMPLETE, MANIFEST, list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def saved(assets, tmp_path_factory):
    """Three checkpoints (every step) and the losses of the uninterrupted run."""
    ckdir = tmp_path_factory.mktemp("saved") / "ck"
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 3, "checkpoint.dir": ckdir, "checkpoint.save_every": 1,
        "checkpoint.keep_last": 0}),))[0]
    assert out["error"] is None, out
    assert [p.name for p in list_checkpoints(ckdir)] == [f"step_00000{i}" for i in (1, 2, 3)]
    return ckdir, [h["loss"] for h in out["history"]]


def _copy(saved, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(saved[0], dst)
    return dst


def _truncate_distcp(path):
    shard = sorted((path / "dist").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def _flip_middle_distcp(path):
    shard = sorted((path / "dist").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, mid-shard: what edge checksums missed
    shard.write_bytes(bytes(data))
    return shard


def _empty_state(path):
    (path / "state.pt").write_bytes(b"")
    return path / "state.pt"


def _cut_metadata(path):
    meta = path / "dist" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:-7])
    return meta


@pytest.mark.parametrize("damage", [
    _flip_middle_distcp, pytest.param(_truncate_distcp, marks=pytest.mark.slow),
    pytest.param(_empty_state, marks=pytest.mark.slow),
    pytest.param(_cut_metadata, marks=pytest.mark.slow)], ids=["flipped", "distcp", "state", "metadata"])
def test_damaged_newest_falls_back_to_the_previous(assets, saved, tmp_path, damage):
    ckdir = _copy(saved, tmp_path)
    bad_file = damage(ckdir / "step_000003")
    before = tree_hashes(ckdir)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 3, "checkpoint.dir": ckdir, "checkpoint.keep_last": 0}),))[0]
    assert out["error"] is None, out
    # resumed from step 2: one step run, with the uninterrupted run's loss at step 3
    assert [h["step"] for h in out["history"]] == [3]
    assert out["history"][0]["loss"] == saved[1][2]
    warning = next(w for w in out["warnings"] if "damaged" in w)
    assert str(bad_file) in warning and "step_000003.damaged" in warning and "not deleted" in warning
    # the damaged checkpoint is kept, byte for byte, beside the new step 3; older ones untouched
    after = tree_hashes(ckdir)
    for rel, digest in before.items():
        if rel in ("metrics.jsonl", "config.yaml"):  # this launch's log and effective config
            continue
        moved = rel.replace("step_000003", "step_000003.damaged", 1)
        assert after[moved] == digest, rel
    assert (ckdir / "step_000003" / COMPLETE).is_file()
    # metrics.jsonl holds each step once: step 3 of the first launch replaced by this one's
    lines = [json.loads(x) for x in (ckdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


def test_explicit_damaged_resume_is_an_error_naming_the_file(assets, saved, tmp_path):
    ckdir = _copy(saved, tmp_path)
    bad_file = _truncate_distcp(ckdir / "step_000003")
    before = tree_hashes(ckdir)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 4, "checkpoint.dir": ckdir, "checkpoint.resume": ckdir / "step_000003"}),))[0]
    kind, message, _ = out["error"]
    # preflight compares the step's files with its manifest before any rank loads it
    assert kind == "PreflightError"  # a ValueError: one line, exit 2 from the command
    assert "checkpoint.resume=" in message and str(bad_file) in message and " at save" in message
    assert "an intact checkpoint (resume from an older step" in message
    assert tree_hashes(ckdir) == before


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_state_pt_is_refused_and_not_run(assets, saved, tmp_path):
    ckdir = _copy(saved, tmp_path)
    step = ckdir / "step_000003"
    marker = tmp_path / "payload_ran"
    state = torch.load(step / "state.pt", weights_only=True)
    state["evil"] = _Payload(str(marker))
    torch.save(state, step / "state.pt")
    # The attacker rewrites the manifest too: only weights_only=True stands in the way.
    manifest.write_manifest(step)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(step / "state.pt", weights_only=True)
    assert not marker.exists()
    before = tree_hashes(ckdir)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 4, "checkpoint.dir": ckdir, "checkpoint.resume": step}),))[0]
    kind, message, _ = out["error"]
    assert kind == "ValueError" and str(step / "state.pt") in message and "weights_only=True" in message
    assert not marker.exists(), "the payload ran"
    assert tree_hashes(ckdir) == before
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 3, "checkpoint.dir": ckdir}),))[0]
    assert out["error"] is None and [h["step"] for h in out["history"]] == [3]
    assert not marker.exists()


def test_saved_files_are_plain_and_the_manifest_matches(saved):
    step = saved[0] / "step_000002"
    assert manifest.verify(step) == []
    state = torch.load(step / "state.pt", weights_only=True)
    rng = torch.load(step / "rng" / "rank_0.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(rng["torch"], torch.Tensor)
    saved_manifest = json.loads((step / MANIFEST).read_text())
    assert (saved_manifest["hash"], saved_manifest["mode"]) == ("crc32", "full")
    recorded = saved_manifest["files"]
    on_disk = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()}
    assert set(recorded) == on_disk - {MANIFEST, COMPLETE}
    for rel, entry in recorded.items():  # an independent CRC32 of each whole file
        data = (step / rel).read_bytes()
        assert entry == {"size": len(data), "digest": f"{zlib.crc32(data):08x}", "of": "all"}, rel
    # the real DCP index of a training step passes the restricted unpickler
    dcp_guard.check_dcp_dir(step / "dist")


def _plant_metadata_payload(step, marker):
    meta = step / "dist" / dcp_guard.METADATA
    index = dcp_guard.load_metadata(meta)
    index.storage_meta = _Payload(str(marker))
    meta.write_bytes(pickle.dumps(index))
    manifest.write_manifest(step)  # the attacker rewrites the manifest too
    return meta


@pytest.mark.slow
def test_train_command_never_runs_a_metadata_payload(assets, saved, tmp_path):
    """The same through `tip-megatron train --nproc 1` as a user types it: an explicit
    resume of the crafted step fails naming the file; resume=auto falls back past it; the
    marker is never written."""
    ckdir = _copy(saved, tmp_path)
    marker = tmp_path / "payload_ran"
    meta = _plant_metadata_payload(ckdir / "step_000003", marker)
    before = tree_hashes(ckdir)

    def train(**extra):
        cmd = [sys.executable, "-m", "tip_megatron.apps.cli", "train", "--nproc", "1",
               *overrides(assets, **{"checkpoint.dir": ckdir, **extra})]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))

    done = train(**{"train.steps": 4, "checkpoint.resume": ckdir / "step_000003"})
    assert done.returncode != 0 and f"{meta}: refused: the pickle refers to " in done.stderr
    assert not marker.exists(), "the payload ran"
    assert tree_hashes(ckdir) == before
    done = train(**{"train.steps": 3})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ckdir / "step_000003.damaged").is_dir() and not marker.exists()


def test_pickle_payload_in_dcp_metadata_is_refused_and_not_run(assets, saved, tmp_path):
    """torch DCP unpickles dist/.metadata with plain pickle: a payload planted there (and a
    manifest rewritten to match) is refused by the restricted unpickler, never run: an
    explicit resume is an error naming the file; resume=auto falls back past it."""
    ckdir = _copy(saved, tmp_path)
    step = ckdir / "step_000003"
    marker = tmp_path / "payload_ran"
    meta = _plant_metadata_payload(step, marker)
    before = tree_hashes(ckdir)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 4, "checkpoint.dir": ckdir, "checkpoint.resume": step}),))[0]
    kind, message, _ = out["error"]
    assert kind == "ValueError" and f"{meta}: refused: the pickle refers to " in message, message
    assert not marker.exists(), "the payload ran"
    assert tree_hashes(ckdir) == before
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 3, "checkpoint.dir": ckdir}),))[0]
    assert out["error"] is None and [h["step"] for h in out["history"]] == [3]
    assert any(str(meta) in w and "step_000003.damaged" in w for w in out["warnings"])
    assert not marker.exists(), "the payload ran"


def test_all_damaged_is_an_error_not_a_fresh_start(assets, saved, tmp_path):
    ckdir = _copy(saved, tmp_path)
    for step in list_checkpoints(ckdir):
        _empty_state(step)
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 4, "checkpoint.dir": ckdir}),))[0]
    kind, message, _ = out["error"]
    assert kind == "ValueError" and "no checkpoint under" in message and "checkpoint.resume=none" in message
    assert sorted(p.name for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step_")) == [
        f"step_00000{i}.damaged" for i in (1, 2, 3)]


def test_checkpoint_verify_edges_is_recorded_and_resumes(assets, tmp_path):
    """checkpoint.verify=edges reaches the manifest (mode edges: shards over 4 MiB would get
    end checksums only; these tiny ones are whole) and such a checkpoint resumes."""
    ckdir = tmp_path / "ck"
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 1, "checkpoint.dir": ckdir, "checkpoint.verify": "edges"}),))[0]
    assert out["error"] is None, out
    recorded = json.loads((ckdir / "step_000001" / MANIFEST).read_text())
    assert recorded["mode"] == "edges" and manifest.verify(ckdir / "step_000001") == []
    out = run_distributed(train_capturing, 1, args=(overrides(assets, **{
        "train.steps": 2, "checkpoint.dir": ckdir}),))[0]
    assert out["error"] is None and [h["step"] for h in out["history"]] == [2]
    assert json.loads((ckdir / "step_000002" / MANIFEST).read_text())["mode"] == "full"

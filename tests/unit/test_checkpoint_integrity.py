"""The manifest's streaming hashes (against zlib / hashlib over the whole bytes), what each
mode catches, older manifests, and the restricted reading of torch DCP's pickles: a real
DCP checkpoint passes; a payload in `.metadata` or in a bytes item is refused and never
runs (while plain torch DCP would run it)."""
import hashlib
import json
import logging
import pickle
import warnings
import zlib

import pytest
import torch

from tip_megatron.checkpoint import dcp_guard, manifest
from tip_megatron.checkpoint.layout import MANIFEST


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks, edges and the small-file limit scaled down so tiny files exercise them."""
    monkeypatch.setattr(manifest, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(manifest, "EDGE_BYTES", 1024)
    monkeypatch.setattr(manifest, "SMALL_FILE_BYTES", 4096)


def _checkpoint(root):
    root.mkdir()
    (root / "dist").mkdir()
    (root / "dist" / "shard.distcp").write_bytes(bytes(range(256)) * 80)  # 20480 bytes: "large"
    (root / "arch.json").write_text('{"a": 1}')
    return root


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm,reference", [
    ("crc32", lambda b: f"{zlib.crc32(b):08x}"),
    ("blake2b", lambda b: hashlib.blake2b(b, digest_size=16).hexdigest()),
    ("sha256", lambda b: hashlib.sha256(b).hexdigest())])
def test_streaming_digest_equals_the_digest_of_the_whole_bytes(tmp_path, small_blocks, algorithm, reference):
    data = bytes((i * 7919) % 251 for i in range(10_001))  # ten blocks and a remainder
    (tmp_path / "f").write_bytes(data)
    assert manifest.file_digest(tmp_path / "f", algorithm=algorithm) == reference(data)
    edges = manifest.file_digest(tmp_path / "f", algorithm=algorithm, edges=True)
    assert edges == reference(data[:1024] + data[-1024:])


def test_full_mode_catches_a_flipped_byte_anywhere(tmp_path, small_blocks):
    root = _checkpoint(tmp_path / "ck")
    written = manifest.write_manifest(root)
    assert written["mode"] == "full" and {e["of"] for e in written["files"].values()} == {"all"}
    assert manifest.verify_files(root) == []
    shard = root / "dist" / "shard.distcp"
    _flip(shard, 10_000)
    assert manifest.verify_files(root) == [
        f"{shard}: content differs from the save (crc32 mismatch: damaged on disk or in transfer)"]


def test_edges_mode_is_cheaper_and_blind_to_the_middle(tmp_path, small_blocks, caplog):
    root = _checkpoint(tmp_path / "ck")
    written = manifest.write_manifest(root, "edges")
    assert written["files"]["dist/shard.distcp"]["of"] == "ends"
    assert written["files"]["arch.json"]["of"] == "all"
    shard = root / "dist" / "shard.distcp"
    _flip(shard, 10_000)
    with caplog.at_level(logging.WARNING):
        assert manifest.verify_files(root) == []  # the documented blind spot
    assert "dist/shard.distcp) have checksums of their first and last MiB only" in caplog.text
    _flip(shard, 20_000)
    assert [p.split(": ")[0] for p in manifest.verify_files(root)] == [str(shard)]
    with pytest.raises(ValueError, match=r"checkpoint.verify='fast': accepted: \['full', 'edges'\]"):
        manifest.write_manifest(root, "fast")


def test_version_1_manifests_still_verify_with_a_warning(tmp_path, small_blocks, caplog):
    """The format written before full checksums: crc32 of small files, of the first and
    last EDGE_BYTES of large ones (computed here with zlib, as that code did)."""
    root = _checkpoint(tmp_path / "ck")
    shard, arch = root / "dist" / "shard.distcp", root / "arch.json"
    big = shard.read_bytes()
    files = {"dist/shard.distcp": {"size": len(big), "crc32": f"{zlib.crc32(big[-1024:], zlib.crc32(big[:1024])):08x}",
                                   "crc_of": "ends"},
             "arch.json": {"size": arch.stat().st_size, "crc32": f"{zlib.crc32(arch.read_bytes()):08x}",
                           "crc_of": "all"}}
    (root / MANIFEST).write_text(json.dumps({"version": 1, "files": files}))
    with caplog.at_level(logging.WARNING):
        assert manifest.verify_files(root) == []
    assert "first and last MiB only" in caplog.text
    _flip(arch, 2)
    assert manifest.verify_files(root)[0].startswith(f"{arch}: content differs")
    (root / MANIFEST).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert manifest.verify_files(root) == []
    assert f"checkpoint {root} has no {MANIFEST}" in caplog.text


def test_check_checkpoint_names_the_files_and_what_to_do(tmp_path):
    root = _checkpoint(tmp_path / "ck")
    manifest.write_manifest(root)
    (root / "arch.json").write_text('{"a": 2}')
    (root / "dist" / "shard.distcp").unlink()
    with pytest.raises(ValueError) as err:
        manifest.check_checkpoint(root, training=False)
    message = str(err.value)
    assert "\n" not in message and f"checkpoint {root} does not verify: " in message
    assert f"{root / 'arch.json'}: content differs" in message and f"{root / 'dist/shard.distcp'}: missing" in message
    assert message.endswith("copy it again from where it was saved")


# ------------------------------------------------------------------ DCP pickles
class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _dcp_save(state, path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": intended here
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _dcp_load(state, path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def test_a_real_dcp_checkpoint_passes(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(4, dtype=torch.bfloat16),
             "extra": {"step": 3, "lr": [0.1, 0.2], "name": "x"}}
    _dcp_save(state, tmp_path / "d")
    dcp_guard.check_dcp_dir(tmp_path / "d")
    with open(tmp_path / "d" / ".metadata", "rb") as f:
        plain = pickle.load(f)  # the trusted reference: our own file
    restricted = dcp_guard.load_metadata(tmp_path / "d" / ".metadata")
    assert restricted.state_dict_metadata == plain.state_dict_metadata
    assert restricted.storage_data == plain.storage_data


def test_a_payload_in_metadata_is_refused_and_never_runs(tmp_path):
    _dcp_save({"w": torch.zeros(3)}, tmp_path / "d")
    meta = tmp_path / "d" / ".metadata"
    index = dcp_guard.load_metadata(meta)
    index.storage_meta = _Payload(str(tmp_path / "ran"))
    meta.write_bytes(pickle.dumps(index))
    with pytest.raises(ValueError) as err:
        dcp_guard.check_dcp_dir(tmp_path / "d")
    assert str(err.value).startswith(f"{meta}: refused: the pickle refers to ")
    assert "open" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()
    with open(meta, "rb") as f:  # the threat is real: plain pickle, as DCP reads it, runs it
        pickle.load(f)
    assert (tmp_path / "ran").exists()


def test_a_payload_in_a_bytes_item_is_refused_while_plain_dcp_would_run_it(tmp_path):
    _dcp_save({"w": torch.zeros(3), "obj": _Payload(str(tmp_path / "ran"))}, tmp_path / "d")
    with pytest.raises(ValueError) as err:
        dcp_guard.check_dcp_dir(tmp_path / "d")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'd' / '__0_0.distcp'}: item 'obj' refused by "
                              "torch.load(weights_only=True)")
    assert "Unsupported global" in message and "\n" not in message
    assert not (tmp_path / "ran").exists()
    _dcp_load({"w": torch.empty(3), "obj": None}, tmp_path / "d")  # torch DCP's own load
    assert (tmp_path / "ran").exists()


def test_damaged_metadata_is_named(tmp_path):
    _dcp_save({"w": torch.zeros(3)}, tmp_path / "d")
    meta = tmp_path / "d" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:-9])
    with pytest.raises(ValueError, match=r"\.metadata: not readable as torch DCP metadata \(damaged"):
        dcp_guard.check_dcp_dir(tmp_path / "d")
    meta.unlink()
    with pytest.raises(ValueError, match=r"\.metadata: missing"):
        dcp_guard.check_dcp_dir(tmp_path / "d")

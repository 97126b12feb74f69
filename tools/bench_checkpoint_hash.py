"""Cost of checkpoint checksums: MiB/s of each streaming hash, and seconds per GiB that
`checkpoint.verify=full` adds to a save (MANIFEST.json hashes every file once written)
and to every load (each reader hashes every file before loading).

    python tools/bench_checkpoint_hash.py                        # 1 GiB of shards in /tmp
    python tools/bench_checkpoint_hash.py --size-mib 64 --repeats 1 --json out.json   # quick
    python tools/bench_checkpoint_hash.py --dir /scratch/ck      # on the checkpoint filesystem

What is measured, on `--shards` files of random bytes totalling `--size-mib` (written and
fsynced first: `write` is that time, the reference a save costs anyway):
  memory   each hash over an in-memory buffer (CPU cost only), MiB/s
  file     `manifest.file_digest` over the files just written (page cache warm, as after
           a save), MiB/s; per GiB: s_per_gib = 1024 / MiB/s
  manifest `manifest.write_manifest(mode)` / `manifest.verify_files` of the directory
           (WORKERS files hashed at once), full and edges: s_per_gib_save, s_per_gib_load
A load from a cold cache also reads the bytes from disk: that read is shared with the load
itself only when both fit the page cache; drop caches (root) to measure it. Load average
is recorded: on a shared machine the numbers are noise; take final figures on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.checkpoint import manifest  # noqa: E402 - after the path insert above


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024, help="total size of the shards (default 1024)")
    p.add_argument("--shards", type=int, default=4, help="files it is split into (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    p.add_argument("--dir", help="where to write the shards (default: a temp dir, removed after)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _write_shards(root: Path, size_mib: int, shards: int) -> float:
    (root / "dist").mkdir(parents=True, exist_ok=True)
    per = (size_mib << 20) // shards
    block = os.urandom(min(per, 8 << 20))
    start = time.perf_counter()
    for i in range(shards):
        with open(root / "dist" / f"__{i}_0.distcp", "wb") as f:
            for _ in range(per // len(block)):
                f.write(block)
            f.write(block[: per % len(block)])
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def _memory_rates(size_mib: int, repeats: int) -> dict:
    buf = memoryview(os.urandom(min(size_mib, 256) << 20))
    rates = {}
    for name, make in manifest.HASHES.items():
        def run():
            h = make()
            for i in range(0, len(buf), manifest.BLOCK_BYTES):
                h.update(buf[i:i + manifest.BLOCK_BYTES])
        rates[name] = (len(buf) >> 20) / _best(run, repeats)
    return rates


def measure(args: argparse.Namespace, root: Path) -> dict:
    mib = args.size_mib
    write_s = _write_shards(root, mib, args.shards)
    files = sorted((root / "dist").glob("*.distcp"))
    file_rates = {name: mib / _best(lambda: [manifest.file_digest(f, algorithm=name) for f in files],
                                    args.repeats) for name in manifest.HASHES}
    modes = {}
    for mode in manifest.MODES:
        save_s = _best(lambda: manifest.write_manifest(root, mode), args.repeats)
        load_s = _best(lambda: manifest.verify_files(root), args.repeats)
        modes[mode] = {"s_per_gib_save": save_s * 1024 / mib, "s_per_gib_load": load_s * 1024 / mib}
    return {"size_mib": mib, "shards": args.shards, "default_hash": manifest.HASH,
            "write_fsync_s_per_gib": write_s * 1024 / mib,
            "memory_mib_s": _memory_rates(mib, args.repeats), "file_mib_s": file_rates,
            "manifest": modes, "loadavg": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def table(r: dict) -> str:
    lines = [f"{r['size_mib']} MiB in {r['shards']} shards; write+fsync {r['write_fsync_s_per_gib']:.2f} s/GiB; "
             f"load average {r['loadavg'][0]:.1f}",
             f"{'hash':10} {'memory MiB/s':>13} {'file MiB/s':>11} {'s/GiB':>7}"]
    for name in r["memory_mib_s"]:
        mark = " (default)" if name == r["default_hash"] else ""
        lines.append(f"{name:10} {r['memory_mib_s'][name]:13.0f} {r['file_mib_s'][name]:11.0f} "
                     f"{1024 / r['file_mib_s'][name]:7.2f}{mark}")
    lines.append(f"{'mode':10} {'save s/GiB':>13} {'load s/GiB':>11}")
    for mode, m in r["manifest"].items():
        lines.append(f"{mode:10} {m['s_per_gib_save']:13.3f} {m['s_per_gib_load']:11.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    logging.getLogger(manifest.__name__).setLevel(logging.ERROR)  # edges mode warns on every verify
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_hash_"))
    try:
        results = measure(args, root / "bench_checkpoint")
    finally:
        shutil.rmtree(root / "bench_checkpoint", ignore_errors=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

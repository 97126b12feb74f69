"""`runtime.device.release_freed_host_memory` gives back freed heap memory that glibc keeps
resident: tensors below the mmap threshold freed in the middle of the heap (what a
checkpoint load leaves) stop counting in the resident set. Linux + glibc only."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc_trim")


#: The measurement, in a fresh interpreter: glibc's heap and mmap threshold in a pytest
#: process that ran other tests first are whatever those left (blocks may already be above
#: the threshold, or the heap's top free), and the test would depend on the test order.
BODY = """
import torch
from pathlib import Path
from tip_megatron.runtime.device import release_freed_host_memory

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

# A freed 30 MiB block raises glibc's mmap threshold (as the first large tensors a run
# frees do), so the 2 MiB blocks below come from the heap; small tensors between them
# keep the heap in use around each, so freeing the blocks leaves holes glibc keeps.
big = torch.ones(30 * 256 * 1024)
del big
blocks, pins = [], []
for _ in range(96):
    blocks.append(torch.ones(512 * 1024))
    pins.append(torch.ones(4096))
before_free = rss()
del blocks
retained = rss()
ok = release_freed_host_memory()
released = rss()
print(before_free, retained, released, ok, sum(p.sum().item() for p in pins))
"""


def test_freed_small_tensors_leave_the_resident_set():
    out = subprocess.run([sys.executable, "-c", BODY], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    before_free, retained, released, ok, pinned = out.stdout.split()
    before_free, retained, released = float(before_free), float(retained), float(released)
    assert ok == "True"
    assert before_free - retained < 48  # glibc kept the freed blocks resident
    assert retained - released > 150  # ... and gave them back now (192 MiB were freed)
    assert float(pinned) == 96 * 4096

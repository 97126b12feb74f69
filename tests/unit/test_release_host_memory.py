"""`runtime.device.release_freed_host_memory` gives back freed heap memory that glibc keeps
resident: tensors below the mmap threshold freed in the middle of the heap (what a
checkpoint load leaves) stop counting in the resident set. Linux + glibc only."""
import platform
from pathlib import Path

import pytest
import torch

from tip_megatron.runtime.device import release_freed_host_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc_trim")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_freed_small_tensors_leave_the_resident_set():
    # A freed 30 MiB block raises glibc's mmap threshold (as the first large tensors a run
    # frees do), so the 2 MiB blocks below come from the heap; small tensors between them
    # keep the heap in use around each, so freeing the blocks leaves holes glibc keeps.
    big = torch.ones(30 * 256 * 1024)
    del big
    blocks, pins = [], []
    for _ in range(96):
        blocks.append(torch.ones(512 * 1024))
        pins.append(torch.ones(4096))
    before_free = _rss_mib()
    del blocks
    retained = _rss_mib()
    assert release_freed_host_memory()
    released = _rss_mib()
    assert before_free - retained < 48  # glibc kept the freed blocks resident
    assert retained - released > 150  # ... and gave them back now (192 MiB were freed)
    assert sum(p.sum().item() for p in pins) == 96 * 4096

"""host_memory.release_freed: freed heap pages go back to the OS; live memory is untouched."""

import ctypes

import numpy as np
import pytest

from bridle_jax import host_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_release_freed_returns_holes_in_the_heap_and_keeps_live_blocks():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # under glibc's mmap threshold: these come from the heap, as a compiler's allocations do
    blocks = [libc.malloc(block) for _ in range(4096)]  # 256 MiB
    keep = blocks[1::64]  # live blocks spread through it: the heap's top cannot simply shrink
    for b in blocks:
        ctypes.memset(b, 7, block)  # touch every page
    for i, b in enumerate(blocks):
        if i % 64 != 1:
            libc.free(b)
    before = _rss_bytes()
    assert host_memory.release_freed()
    after = _rss_bytes()
    assert before - after > 128 * 2**20, (before, after)
    for b in keep:  # the live blocks still hold what was written
        assert np.frombuffer((ctypes.c_uint8 * block).from_address(b), np.uint8).min() == 7
        libc.free(b)

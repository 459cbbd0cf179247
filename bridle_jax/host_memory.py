"""Hands the host memory that compilations freed back to the OS (glibc's `malloc_trim`).

XLA's compiler and the state's initialisation allocate gigabytes in small blocks across threads. Freed, those blocks
stay in glibc's per-thread heaps, counted in the process's RSS for the whole run (1.3 GB after compiling the ImageNet
recipe's ViT-S encoder step on a CPU, BENCHMARKS.md "Train step"). `malloc_trim(0)` returns every free page of every
heap. It moves no live memory, so it is safe at any point; where the C library is not glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def release_freed() -> bool:
    """Returns the freed pages of the C heaps to the OS; True if any were (False where there is no glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False

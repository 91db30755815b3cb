"""Large CPU allocations kept in the process for reuse (Linux, glibc).

A CPU network evaluation allocates and frees feature maps of tens to hundreds of MB. glibc hands
every block above its mmap threshold (at most 32 MB) back to the kernel when it is freed, so the
next feature map of that size is page-faulted in and zero-filled again: 25 ms per 33 MB tensor on
the 2-core EPYC of docs/results.md, section 8, against 1 ms when the memory is reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h; mallopt(3)) and where glibc's dynamic thresholds settle once blocks of
# 32 MB and more have been freed: mmap above 32 MB, trim the heap top past twice that.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
SETTLED_MMAP_THRESHOLD, DEFAULT_MMAP_MAX = 32 * 2**20, 65536
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give the heap top back only past 2 GiB free


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse; keep=False returns to where
    glibc's own thresholds settle. Returns whether the allocator took it: False off glibc (nothing changes).

    The process's resident memory then stays at its high-water mark until the process exits.
    """
    libc = _glibc()
    if libc is None:
        return False
    if keep:
        options = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEPT_TRIM_THRESHOLD}
    else:
        options = {M_MMAP_MAX: DEFAULT_MMAP_MAX, M_MMAP_THRESHOLD: SETTLED_MMAP_THRESHOLD, M_TRIM_THRESHOLD: 2 * SETTLED_MMAP_THRESHOLD}
    return all(libc.mallopt(option, value) for option, value in options.items())

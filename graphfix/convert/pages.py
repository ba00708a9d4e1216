"""Give memory-mapped pages back after a tensor has been copied out of them.

Readers memory-map their sources so nothing is read until needed. But pages
of a mapping stay resident (and counted in the process's RSS) after they were
touched, so streaming through a 13 GB file would end with 13 GB resident even
though only one tensor is in use at a time. ``madvise(MADV_DONTNEED)`` on the
range just consumed drops those pages from this process; for a read-only file
mapping that is always safe, because the kernel re-reads them from the file if
they are touched again. On non-Linux systems it is a no-op.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

_MADV_DONTNEED = 4
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # pragma: no cover
        _libc = None


def release_mapped(addr: int, nbytes: int) -> None:
    """Drop the pages covering ``[addr, addr + nbytes)`` of a READ-ONLY file mapping.

    Never call this on anonymous or written memory: for those MADV_DONTNEED
    discards the contents.
    """
    if _libc is None or nbytes <= 0 or addr == 0:
        return
    page = mmap.PAGESIZE
    start = addr & ~(page - 1)
    end = (addr + nbytes + page - 1) & ~(page - 1)
    _libc.madvise(start, end - start, _MADV_DONTNEED)

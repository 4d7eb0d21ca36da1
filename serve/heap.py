"""Large request buffers go back to the operating system when they are freed.

glibc's malloc serves allocations above ``M_MMAP_THRESHOLD`` with their own mappings, but raises that
threshold to the size of each such block freed (up to 32 MB), after which blocks of request size come
from the heap and stay mapped: a server that received a burst of 20 MB gRPC messages kept 150-220 MB more
resident set for good. A fixed threshold (setting it turns the adjustment off) keeps every buffer of
1 MiB or more in a mapping of its own, returned when freed; smaller ones (the usual request) are not
affected. Applied once per serving process; a ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own
tunable) is left to win, and nothing is done where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("kiln.serve.heap")

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    log.debug("malloc mmap threshold %d bytes: %s", threshold, "set" if done else "refused")
    return done


__all__ = ["MMAP_THRESHOLD", "return_large_buffers"]

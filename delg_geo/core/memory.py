"""The C heap of a long-running process: how many malloc arenas it keeps, and handing freed memory back."""

from __future__ import annotations


def bound_memory() -> None:
    """glibc: at most two malloc arenas, so the request threads do not each keep a heap of their
    own; with :func:`trim_memory` after each request, freed memory goes back to the system. (A fixed
    1 MB mmap threshold was tried as well: no lower RSS in sequential locates, and it risks
    slower TensorFlow allocations, so it is not used.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
_INT_MAX = 2**31 - 1


def keep_freed_memory(arenas: int = 1) -> bool:
    """glibc: keep the memory TensorFlow frees for the next image instead of handing it back.

    Large blocks (a feature map of a 1024 px photo is hundreds of MB) are otherwise mmap'ed for
    each allocation and unmapped on free, and every page of the next one is faulted in and
    zeroed by the kernel again. Here no block is too large for the heap (mmap threshold 2 GB),
    the heap is never trimmed, and all threads share ``arenas`` arenas: a thread's own arena
    cannot hold a block larger than 64 MB and would mmap it anyway. The heap then stays at the
    largest working set seen (the build's RSS is bounded by it), which the next image reuses.
    Call it once at process start, before TensorFlow allocates; ``DELG_GEO_KEEP_MEMORY=0``
    turns it off. Returns whether it took effect (False off glibc).
    """
    import os

    if os.environ.get("DELG_GEO_KEEP_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_ARENA_MAX, int(arenas))
        ok &= libc.mallopt(M_MMAP_THRESHOLD, _INT_MAX)
        ok &= libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc
        return False


def trim_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

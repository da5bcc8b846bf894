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


def trim_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

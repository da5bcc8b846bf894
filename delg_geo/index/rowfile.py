"""Rows of a ``.npy`` file read with ``pread``: what a query reads of the big index files.

A memory map would do the same reads, but every page it touches (and the kernel's read-ahead
around it, 128 KB by default) then counts in the process's resident memory until the kernel
needs it back. Over a million-image store that grew a query process from 1.2 to 4.7 GB in 220
queries; a server answering for days would map the whole store. ``pread`` copies just the rows
asked for into a small array, so resident memory stays flat however many queries run; the
pages stay in the kernel's page cache, shared and reclaimable. ``pread`` is safe from several
threads (verification reads two candidates at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class FileRanges:
    """Byte ranges of one file, read with ``pread`` on a descriptor kept open (no seek: threads
    can share it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset``, or OSError naming the file."""
        buf = os.pread(self._fd, int(size), int(offset)) if size > 0 else b""
        if len(buf) != size:
            raise OSError(f"{self.path}: short read at byte {offset} ({len(buf)} of {size} bytes)")
        return buf

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class NpyRows:
    """Row access to a C-ordered ``.npy`` file of shape ``(N, ...)``: ``rows(a, b)``, and
    ``reader[idx]`` for sorted row numbers (as :func:`delg_geo.index.geo_index.search_refined` asks)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path}: not a C-ordered array of rows")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))
        self._file = FileRanges(self.path)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` (a copy)."""
        a, b = max(0, int(a)), min(len(self), int(b))
        n = max(0, b - a)
        try:
            buf = self._file.read(self.offset + a * self.row_bytes, n * self.row_bytes)
        except OSError as e:
            raise OSError(f"{e} (row {a})") from None
        return np.frombuffer(buf, self.dtype).reshape((n,) + self.shape[1:])

    def __getitem__(self, idx) -> np.ndarray:
        """Rows ``idx`` (sorted row numbers), one read per run of consecutive rows."""
        idx = np.asarray(idx, np.int64)
        if len(idx) == 0:
            return np.zeros((0,) + self.shape[1:], self.dtype)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(idx)]])
        return np.concatenate([self.rows(idx[s], idx[e - 1] + 1) for s, e in zip(starts, ends)])

"""Writing a ``.npy`` file a chunk at a time, for arrays larger than memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class NpyAppender:
    """A ``.npy`` file that grows by chunks; the header's row count is written at ``close``."""

    HEADER = 128

    def __init__(self, path: Path, dtype, width: int | None):
        self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * self.HEADER)

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, self.dtype)
        if x.shape[1:] != ((self.width,) if self.width else ()):
            raise ValueError(f"{self.path.name}: rows of shape {x.shape[1:]}, expected {self.width}")
        self.f.write(x.tobytes())
        self.rows += len(x)

    def close(self) -> None:
        shape = (self.rows, self.width) if self.width else (self.rows,)
        d = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        head = b"\x93NUMPY\x01\x00"
        body = d.encode("latin1")
        pad = self.HEADER - len(head) - 2 - len(body) - 1
        if pad < 0:
            raise ValueError("npy header too long")
        self.f.seek(0)
        self.f.write(head + (self.HEADER - len(head) - 2).to_bytes(2, "little") + body + b" " * pad + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

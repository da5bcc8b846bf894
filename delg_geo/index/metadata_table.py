"""An index's ``metadata.csv`` as a query process holds it: numbers in arrays, names on demand.

At Placing 2016 size (5 million photos) the whole table as a pandas frame of Python strings
takes about 1.5 GB; a query needs only every photo's coordinates and size (arrays, 24 bytes a
photo) and the names of the few photos it answers with. :class:`MetadataTable` therefore reads
the numeric columns once, records where each line of the file starts (8 bytes a photo), and
parses a line only when its row is asked for (:meth:`row`). The whole frame is still there for
batch work (:attr:`frame`, read on first use).

A file whose quoted fields hold line breaks (``pandas`` quotes such names) cannot be indexed by
line; the table then keeps the text columns in memory instead, with the same answers.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from delg_geo.index.rowfile import FileRanges

NUMERIC = ("lat", "lon", "width", "height")
REQUIRED = ("image", "path") + NUMERIC


class MetadataTable:
    """Rows of one index's ``metadata.csv``; ``lats``, ``lons`` (float64) and ``sizes`` ((N, 2)
    int64: width, height) are arrays. Missing columns and bad values are reported by
    :func:`delg_geo.index.integrity.check_metadata` (called here, so a damaged file is refused on open)."""

    def __init__(self, path: str | Path):
        import pandas as pd

        from delg_geo.index.integrity import check_metadata

        self.path = Path(path)
        with open(self.path, newline="") as f:
            self.columns = next(csv.reader(f), [])
        numeric = [c for c in NUMERIC if c in self.columns]
        md = pd.read_csv(self.path, usecols=numeric, keep_default_na=False, na_values=[""])
        check_metadata(md, self.path, columns=self.columns)
        self.lats = md["lat"].to_numpy(np.float64)
        self.lons = md["lon"].to_numpy(np.float64)
        self.sizes = md[["width", "height"]].to_numpy(np.int64)
        self._frame = None
        self._starts = _line_starts(self.path)
        self._file = FileRanges(self.path)
        if len(self._starts) != len(md) + 2:  # header + rows + the end of the file
            # quoted line breaks: lines are not rows; keep the text columns instead
            self._starts = None
            self._text = pd.read_csv(self.path, usecols=[c for c in self.columns if c not in numeric], dtype=str,
                                     keep_default_na=False)

    def __len__(self) -> int:
        return len(self.lats)

    @property
    def frame(self):
        """The whole table as a DataFrame (read on first use, then kept)."""
        if self._frame is None:
            import pandas as pd

            self._frame = pd.read_csv(self.path, keep_default_na=False, na_values=[""])
        return self._frame

    def row(self, i: int) -> dict[str, str]:
        """Row ``i`` (0-based), every column as the text the file holds."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: no row {i} (the table has {len(self)})")
        if self._starts is None:
            d = {c: str(self._text.at[i, c]) for c in self._text.columns}
            d.update(lat=repr(float(self.lats[i])), lon=repr(float(self.lons[i])),
                     width=str(int(self.sizes[i, 0])), height=str(int(self.sizes[i, 1])))
            return d
        a, b = int(self._starts[i + 1]), int(self._starts[i + 2])
        line = self._file.read(a, b - a).decode("utf-8")
        values = next(csv.reader(io.StringIO(line)), [])
        return dict(zip(self.columns, values))

    def value(self, i: int, column: str) -> str:
        return self.row(i).get(column, "")

    def image(self, i: int) -> str:
        """The ``image`` name of row ``i``."""
        return self.value(i, "image")


def _line_starts(path: Path, chunk: int = 8 << 20) -> np.ndarray:
    """Byte offsets where each line starts, plus the file's length at the end (int64)."""
    starts = [np.zeros(1, np.int64)]
    size = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10).astype(np.int64) + size + 1
            starts.append(nl)
            size += len(buf)
    out = np.concatenate(starts)
    if out[-1] != size:  # no line break after the last line
        out = np.append(out, size)
    return out

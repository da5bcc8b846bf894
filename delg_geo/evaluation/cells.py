"""Adaptive S2 partition of the earth into classification cells, as in PlaNet.

PlaNet (Weyand, Kostrikov & Philbin, 2016) turns geolocation into classification over S2 cells:
start from coarse cells (the six faces of the S2 cube), split a cell into its four children while it
holds more than ``t1`` reference images, and finally drop cells that hold fewer than ``t2``. Dense
places therefore get small cells and empty places none. GeoEstimation (Müller-Budack et al., 2018)
publishes partitions of that kind as CSV files; :meth:`Partition.from_csv` reads them and
:meth:`Partition.to_csv` writes the same layout.

Cells are named by their S2 token (the hex cell id with its trailing zeros stripped). Each cell keeps
the centre of mass of its reference images (mean of 3-D unit vectors, projected back onto the
sphere), which is what a classifier predicts as the location of that cell.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import s2sphere

from delg_geo.core.geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit

__all__ = ["Cell", "Partition", "build_partition", "default_thresholds", "leaf_cell_ids"]

MAX_LEVEL = 30
_COLUMNS = ["class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean"]


@dataclass
class Cell:
    token: str
    level: int
    count: int
    lat: float
    lon: float


def leaf_cell_ids(lats, lons) -> np.ndarray:
    """S2 leaf (level 30) cell ids of points, as uint64."""
    lats = np.asarray(lats, dtype=np.float64).ravel()
    lons = np.asarray(lons, dtype=np.float64).ravel()
    if lats.shape != lons.shape:
        raise ValueError(f"lats and lons differ in length: {lats.size} vs {lons.size}")
    if lats.size and (not np.all(np.isfinite(lats)) or not np.all(np.isfinite(lons))):
        raise ValueError("coordinates must be finite")
    if lats.size and (np.abs(lats).max() > 90.0 or np.abs(lons).max() > 360.0):
        raise ValueError("latitudes must lie in [-90, 90] and longitudes in [-360, 360] degrees")
    from_ll = s2sphere.CellId.from_lat_lng
    ll = s2sphere.LatLng.from_degrees
    return np.fromiter((from_ll(ll(a, o)).id() for a, o in zip(lats, lons)), dtype=np.uint64, count=lats.size)


def _parent_ids(ids: np.ndarray, level: int) -> np.ndarray:
    """Vectorised ``CellId.parent(level)`` on uint64 cell ids."""
    lsb = np.uint64(1) << np.uint64(2 * (MAX_LEVEL - level))
    return (ids & ~(lsb - np.uint64(1))) | lsb


def _token(cell_id: int) -> str:
    return format(int(cell_id), "016x").rstrip("0")


def _to_latlon(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(v, dtype=np.float64)
    lat = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    lon = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    return lat, lon


@dataclass
class Partition:
    """A set of disjoint S2 cells; the index of a cell in ``cells`` is its class label."""

    cells: list[Cell]
    t1: int | None = None
    t2: int | None = None
    num_images: int | None = None
    min_level: int | None = None
    max_level: int | None = None
    _lookup: dict = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def lats(self) -> np.ndarray:
        return np.array([c.lat for c in self.cells], dtype=np.float64)

    @property
    def lons(self) -> np.ndarray:
        return np.array([c.lon for c in self.cells], dtype=np.float64)

    @property
    def counts(self) -> np.ndarray:
        return np.array([c.count for c in self.cells], dtype=np.int64)

    def _index(self) -> dict:
        if self._lookup is None:
            by_level: dict[int, dict[int, int]] = {}
            for i, c in enumerate(self.cells):
                cid = s2sphere.CellId.from_token(c.token)
                if not cid.is_valid():
                    raise ValueError(f"cell {i}: {c.token!r} is not a valid S2 token")
                by_level.setdefault(cid.level(), {})[cid.id()] = i
            self._lookup = by_level
        return self._lookup

    def assign(self, lats, lons) -> np.ndarray:
        """Index of the cell holding each point, or -1 where no cell of the partition holds it."""
        ids = leaf_cell_ids(lats, lons)
        out = np.full(ids.shape, -1, dtype=np.int64)
        for level, table in sorted(self._index().items()):
            keys = np.fromiter(table.keys(), dtype=np.uint64, count=len(table))
            vals = np.fromiter(table.values(), dtype=np.int64, count=len(table))
            order = np.argsort(keys)
            keys, vals = keys[order], vals[order]
            parents = _parent_ids(ids, level)
            pos = np.clip(np.searchsorted(keys, parents), 0, len(keys) - 1)
            hit = (keys[pos] == parents) & (out < 0)
            out[hit] = vals[pos[hit]]
        return out

    def cell_size_km(self) -> np.ndarray:
        """Typical size of each cell: the square root of its S2 area, in km."""
        r2 = EARTH_RADIUS_KM**2
        return np.array(
            [math.sqrt(s2sphere.Cell(s2sphere.CellId.from_token(c.token)).approx_area() * r2) for c in self.cells]
        )

    def to_csv(self, path) -> None:
        """Write the GeoEstimation layout: two comment lines, then the five columns."""
        path = Path(path)
        n = self.num_images if self.num_images is not None else int(sum(c.count for c in self.cells))
        lines = [
            f"num_images: {n}",
            f"thresholds: t1={_fmt(self.t1)} t2={_fmt(self.t2)} min_level={_fmt(self.min_level)} "
            f"max_level={_fmt(self.max_level)}",
            ",".join(_COLUMNS),
        ]
        for i, c in enumerate(self.cells):
            lines.append(f"{i},{c.token},{int(c.count)},{float(c.lat)!r},{float(c.lon)!r}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def from_csv(cls, path) -> "Partition":
        """Read a partition written by :meth:`to_csv` or a GeoEstimation ``cells_*.csv`` file.

        Lines before the ``class_label,...`` header are comments; ``num_images: N`` and
        ``thresholds: t1=.. t2=..`` are read from them when present. Rows are ordered by class label.
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8").splitlines()
        meta: dict[str, str] = {}
        start = None
        for k, line in enumerate(text):
            if line.strip().startswith("class_label"):
                start = k
                break
            if ":" in line:
                key, _, value = line.partition(":")
                meta[key.strip()] = value.strip()
        if start is None:
            raise ValueError(f"{path}: no 'class_label,...' header line")
        header = [h.strip() for h in text[start].split(",")]
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        col = {name: header.index(name) for name in _COLUMNS}
        rows = []
        for lineno, line in enumerate(text[start + 1 :], start=start + 2):
            if not line.strip():
                continue
            parts = line.split(",")
            try:
                label = int(parts[col["class_label"]])
                token = parts[col["hex_id"]].strip().lower()
                cid = s2sphere.CellId.from_token(token)
                if not cid.is_valid():
                    raise ValueError(f"invalid S2 token {token!r}")
                rows.append(
                    (
                        label,
                        Cell(
                            token=cid.to_token(),
                            level=cid.level(),
                            count=int(parts[col["imgs_per_cell"]]),
                            lat=float(parts[col["latitude_mean"]]),
                            lon=float(parts[col["longitude_mean"]]),
                        ),
                    )
                )
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
        rows.sort(key=lambda r: r[0])
        labels = [r[0] for r in rows]
        if labels != list(range(len(rows))):
            raise ValueError(f"{path}: class labels are not 0..{len(rows) - 1}")
        thr = dict(re.findall(r"(\w+)=(\d+)", meta.get("thresholds", "")))
        num = meta.get("num_images", "")
        return cls(
            cells=[r[1] for r in rows],
            t1=int(thr["t1"]) if "t1" in thr else None,
            t2=int(thr["t2"]) if "t2" in thr else None,
            num_images=int(num) if num.isdigit() else None,
            min_level=int(thr["min_level"]) if "min_level" in thr else None,
            max_level=int(thr["max_level"]) if "max_level" in thr else None,
        )


def _fmt(x) -> str:
    return "-" if x is None else str(int(x))


def build_partition(lats, lons, t1: int, t2: int, min_level: int = 0, max_level: int = MAX_LEVEL) -> Partition:
    """Adaptive S2 partition of the points (PlaNet).

    Start from the S2 cells at ``min_level`` (0: the six cube faces) that hold points, split a cell
    into its four children while it holds more than ``t1`` points and is above ``max_level``, then
    drop the leaves holding fewer than ``t2`` points. Cells come out in S2 (Hilbert curve) order.
    """
    t1, t2 = int(t1), int(t2)
    if t1 < 1 or t2 < 0:
        raise ValueError(f"need t1 >= 1 and t2 >= 0, got t1={t1}, t2={t2}")
    if not 0 <= min_level <= max_level <= MAX_LEVEL:
        raise ValueError(f"need 0 <= min_level <= max_level <= 30, got {min_level}, {max_level}")
    lats = np.asarray(lats, dtype=np.float64).ravel()
    lons = np.asarray(lons, dtype=np.float64).ravel()
    ids = leaf_cell_ids(lats, lons)
    active = np.arange(ids.size)
    leaves: list[tuple[int, int, np.ndarray]] = []  # (cell id, level, member indices)
    level = min_level
    while active.size:
        parents = _parent_ids(ids[active], level)
        uniq, inverse, counts = np.unique(parents, return_inverse=True, return_counts=True)
        split = (counts > t1) & (level < max_level)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for u in np.flatnonzero(~split):
            leaves.append((int(uniq[u]), level, active[order[bounds[u] : bounds[u + 1]]]))
        active = active[split[inverse]]
        level += 1
    leaves.sort(key=lambda x: x[0])
    vecs = latlon_to_unit(lats, lons)
    cells = []
    for cid, lev, members in leaves:
        if members.size < t2 or members.size == 0:
            continue
        lat, lon = _to_latlon(vecs[members].mean(axis=0))
        cells.append(Cell(token=_token(cid), level=lev, count=int(members.size), lat=float(lat), lon=float(lon)))
    return Partition(cells=cells, t1=t1, t2=t2, num_images=int(ids.size), min_level=min_level, max_level=max_level)


def default_thresholds(lats, lons) -> tuple[int, int]:
    """Thresholds ``(t1, t2)`` suited to a collection's size and extent.

    Rule: aim for ``K`` cells, where ``K = sqrt(N)`` for ``N`` images but at most one cell per
    ``(250 m)^2`` of the collection's extent (the area of the smallest spherical cap around the
    collection's centre of mass holding 95% of the points, so that a tight cluster of photos is not
    cut into cells smaller than photo GPS noise), and at least 1. An adaptive split leaves cells
    holding between about ``t1/4`` and ``t1`` images, so ``t1 = ceil(2 N / K)``. Cells of fewer
    than ``t2 = max(1, round(t1 / 10))`` images are dropped (PlaNet and GeoEstimation use
    ``t1/t2`` between 100 and 200 on millions of images; with a few thousand images a ratio of 10
    keeps the many small tourist spots of a city).
    """
    lats = np.asarray(lats, dtype=np.float64).ravel()
    lons = np.asarray(lons, dtype=np.float64).ravel()
    n = lats.size
    if n == 0:
        raise ValueError("no points")
    lat0, lon0 = _to_latlon(latlon_to_unit(lats, lons).mean(axis=0))
    radius = float(np.quantile(haversine_km(lat0, lon0, lats, lons), 0.95))
    area = 2 * math.pi * EARTH_RADIUS_KM**2 * (1 - math.cos(min(radius / EARTH_RADIUS_KM, math.pi)))
    k = max(1.0, min(math.sqrt(n), area / 0.25**2))
    t1 = max(2, math.ceil(2 * n / k))
    t2 = max(1, round(t1 / 10))
    return int(t1), int(t2)

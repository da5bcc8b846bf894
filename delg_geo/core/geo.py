"""Spherical geometry on WGS84 decimal degrees: distances, validation, centroids.

The Earth is a sphere of radius :data:`EARTH_RADIUS_KM` = 6371.0 km (the mean radius). That is
the radius the Im2GPS benchmark numbers are computed with: the ``great_circle_distance`` column
of the per-image results published by TIBHannover/GeoEstimation is reproduced by
:func:`haversine_km` to within its 0.01 km rounding (largest difference 0.005 km over all twelve
result files), whereas 6371.009 km (the IUGG mean radius) already differs by up to 0.03 km and
the equatorial radius 6378.137 km by up to 22 km.
"""

from __future__ import annotations

import math
import re

import numpy as np

#: Mean Earth radius used for every distance in delg-geo (km).
EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2, radius_km: float = EARTH_RADIUS_KM):
    """Great-circle distance in km between points given in decimal degrees.

    Arguments broadcast like numpy arrays. Returns a Python float when every argument is a
    scalar, else an ndarray. NaN in, NaN out. The haversine form is accurate for small
    distances (a few millimetres at 1 m) and, with the clip, for antipodal points.
    """
    scalar = all(np.ndim(a) == 0 for a in (lat1, lon1, lat2, lon2))
    p1 = np.radians(np.asarray(lat1, dtype=np.float64))
    p2 = np.radians(np.asarray(lat2, dtype=np.float64))
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dphi / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2.0) ** 2
    d = 2.0 * radius_km * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return float(d) if scalar else d


def _as_float(value) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


#: A plain decimal number as people write coordinates: ASCII digits, one optional sign, one
#: optional decimal point and an optional exponent; no underscores (``4_5.5``), no other
#: digits than 0-9, no hexadecimal. ``nan``/``inf`` are matched so that callers can name them.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)",
                      re.IGNORECASE | re.ASCII)


def parse_decimal(text) -> float:
    """``text`` (surrounding blanks ignored) as a float, accepting only plain decimal notation.

    Python's ``float`` also reads ``"4_5.5"`` as 45.5 and non-ASCII digits; this raises
    ValueError for those, and for anything else that is not a decimal number. ``nan``, ``inf``
    and ``infinity`` (any case, signed) give NaN and infinities, for the caller to refuse by name.
    """
    s = str(text).strip()
    if not _DECIMAL.fullmatch(s):
        raise ValueError(f"{s!r} is not a decimal number")
    return float(s)


def valid_latlon(lat, lon) -> bool:
    """True when ``lat``/``lon`` are finite numbers with ``|lat| <= 90`` and ``|lon| <= 180``.

    NaN, infinities, booleans, None and non-numeric strings are all rejected.
    """
    la, lo = _as_float(lat), _as_float(lon)
    if la is None or lo is None:
        return False
    if not (math.isfinite(la) and math.isfinite(lo)):
        return False
    return -90.0 <= la <= 90.0 and -180.0 <= lo <= 180.0


def latlon_to_unit(lats, lons) -> np.ndarray:
    """(N, 3) unit vectors (x towards lat 0/lon 0, z towards the north pole)."""
    phi = np.radians(np.asarray(lats, dtype=np.float64))
    lmb = np.radians(np.asarray(lons, dtype=np.float64))
    cphi = np.cos(phi)
    return np.stack([cphi * np.cos(lmb), cphi * np.sin(lmb), np.sin(phi)], axis=-1)


def unit_to_latlon(vec) -> tuple[float, float]:
    """Latitude and longitude in degrees of a 3-D vector (any non-zero length)."""
    x, y, z = (float(c) for c in np.asarray(vec, dtype=np.float64).reshape(3))
    lat = math.degrees(math.atan2(z, math.hypot(x, y)))
    lon = math.degrees(math.atan2(y, x))
    return lat, lon


def weighted_centroid(lats, lons, weights=None) -> tuple[float, float]:
    """Centre of mass of points on the sphere, projected back onto the surface.

    Points are averaged as 3-D unit vectors, so the result is right across the antimeridian
    (179.9 and -179.9 average to 180, not 0) and near the poles. ``weights`` defaults to equal
    weights; they must be finite, non-negative and not all zero.

    Raises ValueError for no points, invalid coordinates or weights, or points whose vectors
    cancel out (e.g. two antipodes with equal weights), where no centroid is defined.
    """
    lats = np.atleast_1d(np.asarray(lats, dtype=np.float64))
    lons = np.atleast_1d(np.asarray(lons, dtype=np.float64))
    if lats.shape != lons.shape or lats.ndim != 1:
        raise ValueError(
            f"lats and lons must be 1-D and the same length ({lats.shape} vs {lons.shape})"
        )
    if lats.size == 0:
        raise ValueError("no points to average")
    if not (np.all(np.isfinite(lats)) and np.all(np.isfinite(lons))):
        raise ValueError("coordinates must be finite")
    if np.any(np.abs(lats) > 90) or np.any(np.abs(lons) > 180):
        raise ValueError("coordinates out of range (|lat| <= 90, |lon| <= 180)")
    if weights is None:
        w = np.ones_like(lats)
    else:
        w = np.atleast_1d(np.asarray(weights, dtype=np.float64))
        if w.shape != lats.shape:
            raise ValueError(f"weights has shape {w.shape}, expected {lats.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative")
        if not np.any(w > 0):
            raise ValueError("weights are all zero")
    v = (latlon_to_unit(lats, lons) * w[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(v))
    if norm <= 1e-12 * float(w.sum()):
        raise ValueError("points cancel out on the sphere (e.g. antipodes): no centroid")
    return unit_to_latlon(v / norm)


def format_distance(km: float | None) -> str:
    """A distance for people: "85 m", "3.2 km"; "–" for none or NaN, "∞" for infinity."""
    if km is None or (isinstance(km, float) and math.isnan(km)):
        return "–"
    if math.isinf(km):
        return "∞"
    if km < 1:
        return f"{km * 1000:.0f} m"
    return f"{km:.1f} km"

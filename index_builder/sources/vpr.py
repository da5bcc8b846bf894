"""Positions in the file names, as in the visual place recognition datasets (``@utm_east@utm_north@zone@letter@lat@lon@...``) and GSV-Cities."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from delg_geo.core.geo import parse_decimal, valid_latlon
from index_builder.sources.common import (
    GeoRecord,
    IMAGE_EXTENSIONS,
    Result,
    Skipped,
    _check_images_dir,
    _rel,
    _walk_images,
    outside_reason,
)


_VPR_FIELDS = (
    "utm_east", "utm_north", "utm_zone", "utm_letter", "lat", "lon", "pano_id", "tile_num",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)  # fmt: skip
_GSV_CITIES = re.compile(
    r"^(?P<city>[A-Za-z][A-Za-z0-9-]*)_(?P<place_id>\d+)_(?P<year>\d{4})_(?P<month>\d{1,2})_"
    r"(?P<heading>\d{1,3})_(?P<lat>[-+]?\d+(?:\.\d*)?)_(?P<lon>[-+]?\d+(?:\.\d*)?)_(?P<pano_id>.+)$"
)
_UTM_LETTERS = "CDEFGHJKLMNPQRSTUVWX"


def utm_to_latlon(
    easting: float, northing: float, zone: int, northern: bool
) -> tuple[float, float]:
    """WGS84 UTM to latitude/longitude in degrees (Snyder's series, sub-metre in the zone)."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    x = easting - 500000.0
    y = northing if northern else northing - 10000000.0
    mu = y / k0 / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
        + (151 * e1**3 / 96) * math.sin(6 * mu)
        + (1097 * e1**4 / 512) * math.sin(8 * mu)
    )
    s, c, t = math.sin(phi1), math.cos(phi1), math.tan(phi1)
    n1 = a / math.sqrt(1 - e2 * s * s)
    t1 = t * t
    c1 = ep2 * c * c
    r1 = a * (1 - e2) / (1 - e2 * s * s) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - (n1 * t / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720
    )
    lon = (
        d
        - (1 + 2 * t1 + c1) * d**3 / 6
        + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120
    ) / c
    lon0 = (zone - 1) * 6 - 180 + 3
    lon_deg = (math.degrees(lon) + lon0 + 180.0) % 360.0 - 180.0
    return math.degrees(lat), lon_deg


def _float_or_none(s: str) -> float | None:
    """A finite plain decimal number (no underscores: :func:`parse_decimal`), else None."""
    try:
        v = parse_decimal(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def parse_vpr_fields(name) -> dict | None:
    """The fields encoded in a VPR image file name, with float ``lat``/``lon``; None if the
    name follows neither convention or gives no valid position.

    ``@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``:
    lat/lon are used when present; when they are empty the UTM fields are converted.
    GSV-Cities ``city_placeid_year_month_heading_lat_lon_panoid.jpg`` is accepted as well.
    """
    base = os.path.basename(str(name))
    stem, ext = os.path.splitext(base)
    if ext.lower() not in IMAGE_EXTENSIONS:
        stem = base
    if stem.startswith("@"):
        parts = stem.split("@")[1:]
        if len(parts) < 6:
            return None
        out = {k: v for k, v in zip(_VPR_FIELDS, parts) if v != ""}
        lat, lon = _float_or_none(parts[4]), _float_or_none(parts[5])
        if lat is None or lon is None:
            e, n = _float_or_none(parts[0]), _float_or_none(parts[1])
            zone = parts[2].strip()
            letter = parts[3].strip().upper()
            if e is None or n is None or not zone.isdigit() or not 1 <= int(zone) <= 60:
                return None
            if len(letter) != 1 or letter not in _UTM_LETTERS:
                return None
            lat, lon = utm_to_latlon(e, n, int(zone), letter >= "N")
            out["latlon_from_utm"] = True
        if not valid_latlon(lat, lon):
            return None
        out["lat"], out["lon"] = lat, lon
        out["convention"] = "vpr"
        return out
    m = _GSV_CITIES.match(stem)
    if m:
        out = m.groupdict()
        lat, lon = float(out["lat"]), float(out["lon"])
        if not valid_latlon(lat, lon):
            return None
        out["lat"], out["lon"] = lat, lon
        out["convention"] = "gsv-cities"
        return out
    return None


def parse_vpr_filename(name) -> tuple[float, float] | None:
    """``(lat, lon)`` from a VPR-style file name (see :func:`parse_vpr_fields`), else None.

    >>> parse_vpr_filename("@0543256.96@4178906.90@10@S@37.76334@-122.43328@@@@@@@@@.jpg")
    (37.76334, -122.43328)
    """
    f = parse_vpr_fields(name)
    return None if f is None else (f["lat"], f["lon"])


def read_vpr_metadata(images_dir, allow_outside: bool = False) -> Result:
    """Every image file under ``images_dir`` whose name encodes its position (VPR or
    GSV-Cities convention). Other files are :class:`Skipped` with the reason."""
    root = _check_images_dir(images_dir)
    return _vpr_from_files(root, _walk_images(root), allow_outside)


def _vpr_from_files(root: Path, files: list[Path], allow_outside: bool = False) -> Result:
    records: list[GeoRecord] = []
    skipped: list[Skipped] = []
    for i, p in enumerate(files, start=1):
        rel = _rel(p, root)
        why = "" if allow_outside else outside_reason(p, root)
        if why:
            skipped.append(Skipped(None, rel, why))
            continue
        f = parse_vpr_fields(p.name)
        if f is None:
            skipped.append(
                Skipped(
                    None,
                    rel,
                    "file name does not encode a position "
                    "(@utm_east@utm_north@zone@letter@lat@lon@... or GSV-Cities)",
                )
            )
            continue
        lat, lon = f.pop("lat"), f.pop("lon")
        records.append(GeoRecord(i, rel, p.resolve(), lat, lon, f))
    return records, skipped



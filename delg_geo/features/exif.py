"""GPS position from a photo's EXIF (JPEG, TIFF, PNG, WebP, and HEIC through pillow-heif)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from delg_geo.core.errors import ImageLoadError
from delg_geo.features.images import _unidentified_reason  # also registers the HEIC/HEIF opener
from delg_geo.core.geo import valid_latlon

GPS_IFD = 0x8825
_GPS_VERSION, _LAT_REF, _LAT, _LON_REF, _LON, _STATUS = 0, 1, 2, 3, 4, 9


def _text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "ignore")
    if not isinstance(value, str):
        return ""
    return value.replace("\x00", "").strip().upper()


def _number(value) -> float:
    """A rational, int or float as float; NaN for anything else (0/0 rationals included)."""
    try:
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return float("nan")


def _dms_problem(value) -> str:
    """Why an EXIF GPS (degrees, minutes, seconds) triple is not a valid angle, or "": minutes
    and seconds must lie in [0, 60) (45 degrees 90 minutes is not 46.5 degrees)."""
    if not isinstance(value, (tuple, list)) or len(value) < 2:
        return ""
    for part, unit in zip(list(value)[1:3], ("minutes", "seconds")):
        v = _number(part)
        if math.isfinite(v) and v >= 60:
            return f"{unit} {v:g} (must be under 60)"
    return ""


def _degrees(value) -> float:
    """EXIF GPS coordinate (degrees, minutes, seconds rationals, or fewer parts) to degrees;
    NaN when a part is not a number, negative, or minutes/seconds are 60 or more."""
    if isinstance(value, (tuple, list)):
        parts = [_number(v) for v in value]
    else:
        parts = [_number(value)]
    if not 1 <= len(parts) <= 3:
        return float("nan")
    if any(not math.isfinite(p) for p in parts):
        return float("nan")
    if len(parts) > 1 and any(p < 0 for p in parts):
        return float("nan")
    if _dms_problem(value):
        return float("nan")
    deg = 0.0
    for p, div in zip(parts, (1.0, 60.0, 3600.0)):
        deg += p / div
    return deg


def read_exif_gps_reason(path) -> tuple[tuple[float, float] | None, str]:
    """Like :func:`read_exif_gps` but also says why there is no position.

    Returns ``((lat, lon), "")`` or ``(None, reason)``.
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(p, "file not found")
    if p.is_dir():
        raise ImageLoadError(p, "is a directory, not an image")
    if p.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as img:
                fmt = f"{img.format} image" if img.format else "image"
                gps = img.getexif().get_ifd(GPS_IFD)
    except UnidentifiedImageError:
        with open(p, "rb") as fh:
            return None, _unidentified_reason(fh.read(32))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "no readable EXIF"
        return None, f"cannot read EXIF ({type(exc).__name__}: {exc})"
    if not gps:
        return None, f"no EXIF GPS data ({fmt})"
    if _LAT not in gps or _LON not in gps:
        return None, "EXIF GPS has no latitude/longitude"
    if _text(gps.get(_STATUS, "")) == "V":
        return None, "EXIF GPS status is V (measurement void)"
    lat_ref, lon_ref = _text(gps.get(_LAT_REF, "")), _text(gps.get(_LON_REF, ""))
    if lat_ref[:1] not in ("N", "S") or lon_ref[:1] not in ("E", "W"):
        return None, f"EXIF GPS reference missing or invalid (lat {lat_ref!r}, lon {lon_ref!r})"
    for key, name in ((_LAT, "latitude"), (_LON, "longitude")):
        why = _dms_problem(gps[key])
        if why:
            return None, f"EXIF GPS {name} is not a valid angle: {why}"
    lat, lon = _degrees(gps[_LAT]), _degrees(gps[_LON])
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None, "EXIF GPS coordinates are not valid numbers"
    # A signed value with a reference is taken by magnitude; the reference gives the sign.
    lat = -abs(lat) if lat_ref.startswith("S") else abs(lat)
    lon = -abs(lon) if lon_ref.startswith("W") else abs(lon)
    if not valid_latlon(lat, lon):
        return None, f"EXIF GPS position {lat:.6f}, {lon:.6f} is out of range"
    if lat == 0.0 and lon == 0.0:
        return None, "EXIF GPS position is 0, 0 (no fix)"
    return (lat, lon), ""


def read_exif_gps(path) -> tuple[float, float] | None:
    """``(lat, lon)`` in decimal degrees from the EXIF GPS IFD, or None.

    Handles degree/minute/second rationals, N/S/E/W references (as str or bytes), and returns
    None when there is no EXIF, no GPS IFD, a missing coordinate or reference, a 0/0 rational,
    a void GPS status, a position out of range or exactly 0, 0 (cameras without a fix), or a
    corrupt file. A path that does not exist raises :class:`ImageLoadError`.
    """
    return read_exif_gps_reason(path)[0]

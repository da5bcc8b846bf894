"""What every metadata reader shares: the records it returns, coordinates, image paths, CSV reading."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from delg_geo.core.errors import MetadataError
from delg_geo.core.geo import parse_decimal


#: File name extensions treated as images (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif"})

#: Why a file whose real path (symlinks resolved) lies outside the images folder is left out.
OUTSIDE_REASON = "symlink leads outside the images folder (--allow-outside permits it)"

_IMAGE_ALIASES = ("image", "image_path", "path", "file", "filename")
_LAT_ALIASES = ("lat", "latitude")
_LON_ALIASES = ("lon", "lng", "long", "longitude")


@dataclass
class GeoRecord:
    """One geotagged image.

    ``row`` is the line number in the metadata file (its header, if any, is line 1) or, for
    sources without a file (EXIF, VPR names), the 1-based position in the sorted file list.
    ``image`` is the path as given (relative to the images folder for file-listing sources),
    ``path`` the resolved absolute path.
    """

    row: int
    image: str
    path: Path
    lat: float
    lon: float
    extra: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """A row or file that was left out, and why."""

    row: int | None
    image: str
    reason: str


Result = tuple[list[GeoRecord], list[Skipped]]


def _check_images_dir(images_dir) -> Path:
    d = Path(images_dir)
    if not d.exists():
        raise MetadataError(f"{d}: images folder not found")
    if not d.is_dir():
        raise MetadataError(f"{d}: not a folder")
    return d


def _parse_coord(value, name: str, limit: float) -> tuple[float | None, str]:
    """(value, "") or (None, reason) for one latitude/longitude field."""
    s = "" if value is None else str(value).strip()
    if not s:
        return None, f"missing {name}"
    try:  # strict: Python's float() would read "4_5.5" as 45.5
        v = parse_decimal(s)
    except ValueError:
        return None, f"{name} {s!r} is not a number (expected plain decimal notation, e.g. 45.4371)"
    if math.isnan(v):
        return None, f"{name} is NaN"
    if math.isinf(v):
        return None, f"{name} is infinite"
    if abs(v) > limit:
        return None, f"{name} {s} out of range [-{limit:g}, {limit:g}]"
    return v, ""


def _parse_latlon(lat, lon) -> tuple[tuple[float, float] | None, str]:
    la, why = _parse_coord(lat, "latitude", 90.0)
    if la is None:
        return None, why
    lo, why = _parse_coord(lon, "longitude", 180.0)
    if lo is None:
        return None, why
    return (la, lo), ""


def outside_reason(path, images_dir) -> str:
    """"" when the real path of ``path`` (every symlink resolved) lies inside the real
    ``images_dir``; otherwise why it is refused."""
    root = os.path.realpath(images_dir)
    real = os.path.realpath(path)
    return "" if os.path.commonpath([root, real]) == root else OUTSIDE_REASON


def _walk_images(images_dir: Path, all_files: bool = False) -> list[Path]:
    """Image files (``all_files``: every file) under ``images_dir``, recursively, sorted by
    relative path.

    Hidden files and folders (name starting with ".") are left out, which also drops macOS
    "._name.jpg" resource forks. Symlinked folders are followed once; whether a file's real
    path stays inside ``images_dir`` is for the caller to check (:func:`outside_reason`).
    """
    root = Path(images_dir)
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if all_files or os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                p = Path(dirpath) / name
                if p.is_file():
                    found.append(p)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _open_text(path: Path):
    """Open a text file that may be bzip2-, gzip- or xz-compressed (detected from its bytes)."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"BZh"):
        raw = bz2.open(path, "rb")
    elif magic.startswith(b"\x1f\x8b"):
        raw = gzip.open(path, "rb")
    elif magic.startswith(b"\xfd7zXZ\x00"):
        raw = lzma.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline=None)


_BINARY_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive; unzip it and pass the CSV inside"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
)


def not_text_reason(path: Path, line: str) -> str:
    """Why ``path``, whose first line (decoded) is ``line``, is not a text table, or "".

    Known binary formats are named from the file's first bytes (JPEG, PNG, ZIP, PDF, ...);
    otherwise NUL or other control characters in the first line mark binary data.
    """
    from delg_geo.features.images import sniff_format

    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        head = b""
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            return what
    kind = sniff_format(head)
    if kind is not None and kind != "a gzip archive":  # gzip is read (a compressed CSV)
        return kind
    if any(ord(c) < 32 and c != "\t" for c in line) or line.count("\ufffd") > 2:
        return "binary data"
    return ""


def _first_line(path: Path) -> str:
    """The first non-blank line of a (possibly compressed) text file; MetadataError when the
    file is missing, unreadable or not text (a JPEG, a ZIP, ...)."""
    first = ""
    try:
        with _open_text(path) as fh:
            for line in fh:
                if line.strip():
                    first = line.rstrip("\r\n")
                    break
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file not found") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise MetadataError(f"{path}: cannot read metadata file ({exc})") from None
    why = not_text_reason(Path(path), first)
    if why:
        raise MetadataError(f"{path}: not a CSV file (it is {why}); expected a text file with a header line "
                            "such as image,lat,lon")
    return first


def _find_column(header: list[str], aliases: tuple[str, ...]) -> int | None:
    norm = [h.strip().lower() for h in header]
    for a in aliases:
        if a in norm:
            return norm.index(a)
    return None


def _csv_delimiter(header_line: str) -> str:
    """The delimiter (",", tab or ";") that splits the header into image/lat/lon columns."""
    best, best_score = ",", -1
    for d in (",", "\t", ";"):
        fields = next(csv.reader([header_line], delimiter=d), [])
        score = sum(
            _find_column(fields, al) is not None
            for al in (_IMAGE_ALIASES, _LAT_ALIASES, _LON_ALIASES)
        )
        if score > best_score:
            best, best_score = d, score
    return best



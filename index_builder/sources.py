"""Where the coordinates of the images to index come from.

Every reader returns ``(records, skipped)``: a list of :class:`GeoRecord` (one per usable image)
and a list of :class:`Skipped` (one per unusable row or file, with the reason). Row-level
problems never raise; only a metadata file that cannot be read at all raises
:class:`~delg_geo.errors.MetadataError`.

Sources:

* :func:`read_csv_metadata` -- a CSV with columns ``image,lat,lon`` (extra columns are kept);
* :func:`read_exif_metadata` -- GPS in each image's EXIF;
* :func:`read_vpr_metadata` -- coordinates in the file names, as in the visual place recognition
  datasets (Pitts30k/250k, SF-XL, Tokyo 24/7, St Lucia, ... formatted by
  gmberton/VPR-datasets-downloader: ``@utm_east@utm_north@zone@letter@lat@lon@pano_id@...``) and
  GSV-Cities (``city_placeid_year_month_heading_lat_lon_panoid.jpg``);
* :func:`read_yfcc_metadata` -- MediaEval Placing task files (YFCC100M photo id, hash) with the
  YFCC100M metadata file, or Placing ``key,lat,lon`` tables;
* :func:`read_metadata` -- picks one of the above.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from delg_geo.errors import ImageLoadError, MetadataError
from delg_geo.exif import read_exif_gps_reason
from delg_geo.geo import valid_latlon

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


# --------------------------------------------------------------------------------------------
# helpers


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
    try:
        v = float(s)
    except ValueError:
        return None, f"{name} {s!r} is not a number"
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


def _first_line(path: Path) -> str:
    try:
        with _open_text(path) as fh:
            for line in fh:
                if line.strip():
                    return line.rstrip("\r\n")
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file not found") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise MetadataError(f"{path}: cannot read metadata file ({exc})") from None
    return ""


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


# --------------------------------------------------------------------------------------------
# CSV


def _is_absolute(image: str) -> bool:
    return (
        PurePosixPath(image).is_absolute()
        or PureWindowsPath(image).is_absolute()
        or bool(PureWindowsPath(image).drive)
        or image.startswith("\\")
    )


def resolve_image_path(
    image: str, images_dir, allow_outside: bool = False
) -> tuple[Path | None, str]:
    """Resolve ``image`` against ``images_dir``: ``(path, "")`` or ``(None, reason)``.

    Absolute paths, relative ones that climb out of ``images_dir`` (``../x.jpg``), and paths
    whose real location (every symlink resolved) lies outside ``images_dir`` are refused unless
    ``allow_outside``. The returned path is fully resolved.
    """
    root = Path(images_dir)
    if _is_absolute(image):
        if not allow_outside:
            return None, (
                "absolute path not allowed (paths must be relative to the images folder; "
                "allow_outside permits it)"
            )
        return Path(image).resolve(), ""
    base = os.path.abspath(root)
    joined = os.path.normpath(os.path.join(base, image))
    if not allow_outside and os.path.commonpath([base, joined]) != base:
        return None, "path escapes the images folder (allow_outside permits it)"
    if not allow_outside and os.path.lexists(joined):
        why = outside_reason(joined, base)
        if why:
            return None, why
    return Path(joined).resolve(), ""


def iter_csv_rows(csv_path, required, expected: str, delimiter: str = ",", what: str = "file"):
    """Yield ``(line, get, header, cols)`` for each non-blank data row of a CSV with a header.

    ``required`` is ``((name, aliases), ...)``; ``cols[name]`` is the matched column index and
    ``get(i)`` the row's stripped field ``i`` ("" when the row is short). ``line`` is the row's
    first line number (the header is line 1). Missing columns, unreadable or empty files raise
    MetadataError naming the file.
    """
    header: list[str] | None = None
    cols: dict[str, int] = {}
    try:
        with _open_text(Path(csv_path)) as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            last_line = 0
            for fields in reader:
                start = last_line + 1
                last_line = reader.line_num
                if not fields or all(not f.strip() for f in fields):
                    continue
                if header is None:
                    header = [h.strip() for h in fields]
                    for name, aliases in required:
                        idx = _find_column(header, aliases)
                        if idx is None:
                            raise MetadataError(
                                f"{csv_path}: missing required column {name!r} "
                                f"(columns found: {', '.join(header) or 'none'}; expected {expected})"
                            )
                        cols[name] = idx
                    continue

                def get(i: int, fields: list[str] = fields) -> str:
                    return fields[i].strip() if i < len(fields) else ""

                yield start, get, header, cols
    except csv.Error as exc:
        raise MetadataError(f"{csv_path}: not a readable CSV ({exc})") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise MetadataError(f"{csv_path}: cannot read {what} ({exc})") from None
    if header is None:
        raise MetadataError(f"{csv_path}: {what} is empty")


def read_csv_metadata(csv_path, images_dir, allow_outside: bool = False) -> Result:
    """Read a CSV with columns ``image,lat,lon`` (any order, case-insensitive; ``latitude``,
    ``longitude``/``lng`` and ``path``/``filename`` are accepted too). Comma, tab or semicolon
    separated; other columns go to ``GeoRecord.extra`` as strings.

    Each bad row becomes a :class:`Skipped` with its line number: empty image path, path
    escaping ``images_dir`` (``../x.jpg``) or absolute (unless ``allow_outside``), missing,
    non-numeric, NaN, infinite or out-of-range coordinates, missing file, duplicate image (the
    first occurrence is kept). A missing required column raises MetadataError naming it.
    """
    csv_path = Path(csv_path)
    root = _check_images_dir(images_dir)
    if not csv_path.exists():
        raise MetadataError(f"{csv_path}: metadata file not found")
    header_line = _first_line(csv_path)
    if not header_line.strip():
        raise MetadataError(f"{csv_path}: metadata file is empty")
    delim = _csv_delimiter(header_line)
    records: list[GeoRecord] = []
    skipped: list[Skipped] = []
    seen: dict[Path, int] = {}
    required = (("image", _IMAGE_ALIASES), ("lat", _LAT_ALIASES), ("lon", _LON_ALIASES))
    for start, get, header, cols in iter_csv_rows(csv_path, required, "image,lat,lon", delim, "metadata file"):
        extra_cols = [(i, h) for i, h in enumerate(header) if i not in cols.values()]
        image = get(cols["image"])
        if not image:
            skipped.append(Skipped(start, "", "empty image path"))
            continue
        path, why = resolve_image_path(image, root, allow_outside)
        if path is None:
            skipped.append(Skipped(start, image, why))
            continue
        ll, why = _parse_latlon(get(cols["lat"]), get(cols["lon"]))
        if ll is None:
            skipped.append(Skipped(start, image, why))
            continue
        if not path.exists():
            skipped.append(Skipped(start, image, f"file not found: {path}"))
            continue
        if not path.is_file():
            skipped.append(Skipped(start, image, f"not a file: {path}"))
            continue
        if path in seen:
            skipped.append(Skipped(start, image, f"duplicate image (first listed on line {seen[path]})"))
            continue
        seen[path] = start
        extra = {h: get(i) for i, h in extra_cols}
        records.append(GeoRecord(start, image, path, ll[0], ll[1], extra))
    return records, skipped


# --------------------------------------------------------------------------------------------
# EXIF


def read_exif_metadata(images_dir, allow_outside: bool = False) -> Result:
    """Every file under ``images_dir`` (recursive, sorted, hidden ones left out) with its EXIF
    GPS position (JPEG, TIFF, PNG, WebP, HEIC/HEIF).

    Every other file is :class:`Skipped` (``row=None``) with the reason, e.g. "no EXIF GPS
    data (GIF image)", "empty file", "not an image" or "symlink leads outside the images
    folder": nothing in the folder is dropped silently.
    """
    root = _check_images_dir(images_dir)
    records: list[GeoRecord] = []
    skipped: list[Skipped] = []
    for i, p in enumerate(_walk_images(root, all_files=True), start=1):
        rel = _rel(p, root)
        why = "" if allow_outside else outside_reason(p, root)
        if why:
            skipped.append(Skipped(None, rel, why))
            continue
        try:
            pos, why = read_exif_gps_reason(p)
        except ImageLoadError as exc:
            pos, why = None, exc.reason
        if pos is None:
            skipped.append(Skipped(None, rel, why))
            continue
        records.append(GeoRecord(i, rel, p.resolve(), pos[0], pos[1], {"source": "exif"}))
    return records, skipped


# --------------------------------------------------------------------------------------------
# VPR file names

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
    try:
        v = float(s)
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


# --------------------------------------------------------------------------------------------
# MediaEval Placing / YFCC100M

_HASH = re.compile(r"^[0-9a-fA-F]{16,40}$")
_HEADER_WORDS = {"photo_id", "photoid", "id", "hash", "photo_hash", "key", "lat", "latitude"}


def _is_photo_id(s: str) -> bool:
    return s.isdigit() and len(s) <= 15


def _norm_hash(s: str) -> str:
    # Placing 2015 ground-truth files drop leading zeros of some hashes; compare without them.
    return s.strip().lower().lstrip("0")


def _split(line: str) -> list[str]:
    line = line.rstrip("\r\n")
    return line.split("\t") if "\t" in line else line.split(",")


def _yfcc_layout(fields: list[str]) -> tuple[int | None, int | None, int, int] | None:
    """(id column, hash column, lat column, lon column) of one metadata line, by field count."""
    n = len(fields)
    if n == 25:  # yfcc100m_dataset (2016): line no., id, hash, user, ..., longitude, latitude, ...
        return 1, 2, 13, 12
    if n in (23, 24):  # yfcc100m_dataset-N (2014): id, user, ..., longitude (10), latitude (11)
        return 0, None, 11, 10
    if n == 3:  # Placing key,lat,lon tables (medoids: photo id; ground.*.csv: hash)
        key = fields[0].strip()
        return (0, None, 1, 2) if _is_photo_id(key) else (None, 0, 1, 2)
    return None


@dataclass
class _Entry:
    row: int
    photo_id: str | None
    hash: str | None
    lat: str | None = None
    lon: str | None = None
    found: bool = False


class _FileFinder:
    """Finds ``<id>.jpg`` directly, else in an index of every image under the folder by stem."""

    def __init__(self, root: Path, files: list[Path] | None = None):
        self.root = root
        self._files = files
        self._index: dict[str, list[Path]] | None = None

    def _build(self) -> dict[str, list[Path]]:
        index: dict[str, list[Path]] = {}
        for p in self._files if self._files is not None else _walk_images(self.root):
            stem = p.stem
            index.setdefault(stem, []).append(p)
            if _HASH.match(stem):
                index.setdefault("#" + _norm_hash(stem), []).append(p)
        return index

    def find(self, photo_id: str | None, hash_: str | None) -> tuple[Path | None, str]:
        if photo_id:
            direct = self.root / f"{photo_id}.jpg"
            if direct.is_file():
                return direct, ""
        if self._index is None:
            self._index = self._build()
        keys = []
        if photo_id:
            keys.append(photo_id)
        if hash_:
            keys += [hash_, "#" + _norm_hash(hash_)]
        for k in keys:
            hits = self._index.get(k)
            if hits:
                uniq = sorted(set(hits))
                if len(uniq) > 1:
                    names = ", ".join(_rel(h, self.root) for h in uniq[:3])
                    return (
                        None,
                        f"ambiguous: {len(uniq)} image files named {k.lstrip('#')} ({names})",
                    )
                return uniq[0], ""
        want = photo_id or hash_
        return None, f"no image file {want}.jpg (or {want}.* in a subfolder) under {self.root}"


def _read_placing_entries(placing_file: Path) -> tuple[list[_Entry], list[Skipped]]:
    entries: list[_Entry] = []
    skipped: list[Skipped] = []
    try:
        with _open_text(placing_file) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                f = [x.strip() for x in _split(line)]
                key = f[0]
                if not entries and not skipped and key.lower() in _HEADER_WORDS:
                    continue  # header line
                hash_col = f[1] if len(f) > 1 and _HASH.match(f[1]) and not f[1].isdigit() else None
                if len(f) >= 3 and hash_col is None and _float_or_none(f[1]) is not None:
                    # key,lat,lon with the coordinates inline
                    if _is_photo_id(key):
                        entries.append(_Entry(lineno, key, None, f[1], f[2], True))
                    elif _HASH.match(key):
                        entries.append(_Entry(lineno, None, key, f[1], f[2], True))
                    else:
                        skipped.append(
                            Skipped(lineno, key, f"{key!r} is neither a photo id nor a hash")
                        )
                    continue
                if _is_photo_id(key):
                    entries.append(_Entry(lineno, key, hash_col))
                elif _HASH.match(key):
                    entries.append(_Entry(lineno, None, key))
                else:
                    skipped.append(
                        Skipped(lineno, key, f"{key!r} is not a YFCC100M photo id or hash")
                    )
    except FileNotFoundError:
        raise MetadataError(f"{placing_file}: Placing file not found") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise MetadataError(f"{placing_file}: cannot read Placing file ({exc})") from None
    return entries, skipped


def _lookup_yfcc(yfcc_file: Path, entries: list[_Entry]) -> None:
    """Fill the coordinates of ``entries`` from a YFCC100M metadata file (streamed)."""
    by_id: dict[str, _Entry] = {}
    by_hash: dict[str, _Entry] = {}
    for e in entries:  # the first listing of a photo wins; later ones are duplicates
        if e.found:
            continue
        if e.photo_id:
            by_id.setdefault(e.photo_id, e)
        if e.hash:
            by_hash.setdefault(_norm_hash(e.hash), e)
    if not by_id and not by_hash:
        return
    layout = None
    try:
        with _open_text(yfcc_file) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                f = _split(line)
                lay = _yfcc_layout(f)
                if lay is None:
                    if layout is None:
                        raise MetadataError(
                            f"{yfcc_file}: line {lineno} has {len(f)} fields; expected the YFCC100M "
                            "metadata (25 tab-separated fields with line number, photo id and hash "
                            "first, or the 23-field 2014 release) or key,lat,lon"
                        )
                    continue
                if layout is None and len(f) == 3 and f[0].strip().lower() in _HEADER_WORDS:
                    continue
                layout = lay
                id_col, hash_col, lat_col, lon_col = lay
                e = None
                if id_col is not None:
                    e = by_id.get(f[id_col].strip())
                if e is None and hash_col is not None:
                    e = by_hash.get(_norm_hash(f[hash_col]))
                if e is None or e.found:
                    continue
                e.lat, e.lon, e.found = f[lat_col].strip(), f[lon_col].strip(), True
                if hash_col is not None and not e.hash:
                    e.hash = f[hash_col].strip()
                if id_col is not None and not e.photo_id:
                    e.photo_id = f[id_col].strip()
    except FileNotFoundError:
        raise MetadataError(f"{yfcc_file}: YFCC100M metadata file not found") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise MetadataError(f"{yfcc_file}: cannot read YFCC100M metadata file ({exc})") from None


def read_yfcc_metadata(placing_file, yfcc_metadata_file, images_dir, allow_outside: bool = False) -> Result:
    """Images of a MediaEval Placing / YFCC100M subset with their coordinates.

    ``placing_file`` lists the photos, one per line, tab- (or comma-) separated, optionally
    bz2/gzip/xz-compressed. Either column 0 is the YFCC100M photo id and column 1 its hash
    (the Placing 2016 task files; more columns are ignored) and the coordinates come from
    ``yfcc_metadata_file``, or the line is ``key,lat,lon`` with the coordinates inline (the
    Placing 2016 ``medoids.*`` files are ``photo_id,lat,lon``; Placing 2015 ``ground.*.csv`` are
    ``hash,lat,lon``). With ``placing_file=None`` every image under ``images_dir`` named by a
    photo id or hash is looked up.

    ``yfcc_metadata_file`` is the YFCC100M metadata, streamed (only the wanted ids are kept):
    the 25-column ``yfcc100m_dataset`` (line number, photo id, hash, user NSID, nickname, date
    taken, date uploaded, device, title, description, user tags, machine tags, longitude,
    latitude, accuracy, ...), the 23-column 2014 release (photo id first, longitude in column
    10, latitude in 11) -- note that longitude precedes latitude in both -- or a ``key,lat,lon``
    table keyed by photo id or hash. Hashes are matched without leading zeros.

    Files are ``<images_dir>/<photo_id>.jpg`` or, found with one recursive scan, any image named
    by the photo id or the hash in a subfolder (``ab/cd/<id>.jpg``). Every row without a
    position, file, or with a duplicate photo is a :class:`Skipped` with its line number.
    """
    root = _check_images_dir(images_dir)
    skipped: list[Skipped] = []
    files: list[Path] | None = None
    if placing_file is None:
        if yfcc_metadata_file is None:
            raise MetadataError(
                "read_yfcc_metadata needs a Placing file, a YFCC100M metadata file, or both"
            )
        files = _walk_images(root)
        entries = []
        for i, p in enumerate(files, start=1):
            if _is_photo_id(p.stem):
                entries.append(_Entry(i, p.stem, None))
            elif _HASH.match(p.stem):
                entries.append(_Entry(i, None, p.stem))
            else:
                skipped.append(
                    Skipped(None, _rel(p, root), "file name is not a YFCC100M photo id or hash")
                )
        source = Path(yfcc_metadata_file)
    else:
        placing_file = Path(placing_file)
        entries, skipped = _read_placing_entries(placing_file)
        source = placing_file
    if any(not e.found for e in entries):
        if yfcc_metadata_file is None:
            raise MetadataError(
                f"{source}: lists photo ids/hashes without coordinates; pass the YFCC100M metadata "
                "file (yfcc100m_dataset) as well"
            )
        source = Path(yfcc_metadata_file)
        _lookup_yfcc(source, entries)

    finder = _FileFinder(root, files)
    records: list[GeoRecord] = []
    seen_key: dict[str, int] = {}
    seen_path: dict[Path, int] = {}
    for e in entries:
        label = e.photo_id or e.hash or ""
        key = f"id:{e.photo_id}" if e.photo_id else f"hash:{_norm_hash(e.hash or '')}"
        if key in seen_key:
            skipped.append(
                Skipped(e.row, label, f"duplicate photo (first listed on line {seen_key[key]})")
            )
            continue
        seen_key[key] = e.row
        if not e.found:
            skipped.append(Skipped(e.row, label, f"not found in {source.name}"))
            continue
        if not (e.lat or "").strip() and not (e.lon or "").strip():
            skipped.append(
                Skipped(e.row, label, "not geotagged (no coordinates in the YFCC100M metadata)")
            )
            continue
        ll, why = _parse_latlon(e.lat, e.lon)
        if ll is None:
            skipped.append(Skipped(e.row, label, why))
            continue
        path, why = finder.find(e.photo_id, e.hash)
        if path is not None and not allow_outside:
            why = outside_reason(path, root)
            path = None if why else path
        if path is None:
            skipped.append(Skipped(e.row, label, why))
            continue
        path = path.resolve()
        if path in seen_path:
            skipped.append(Skipped(e.row, label, f"same image file as line {seen_path[path]}"))
            continue
        seen_path[path] = e.row
        rel = _rel(path, root.resolve()) if path.is_relative_to(root.resolve()) else str(path)
        extra = {"photo_id": e.photo_id or "", "hash": e.hash or ""}
        records.append(GeoRecord(e.row, rel, path, ll[0], ll[1], extra))
    skipped.sort(key=lambda k: (k.row is None, k.row or 0))
    return records, skipped


# --------------------------------------------------------------------------------------------
# dispatch

FORMATS = ("auto", "csv", "exif", "vpr", "yfcc")
_FORMAT_ALIASES = {"placing": "yfcc", "mediaeval": "yfcc", "gsv-cities": "vpr", "filename": "vpr"}


def _sniff(path: Path) -> str:
    """ "csv" when the first line is a header naming an image column (or anything that is not
    data), "yfcc" when it starts with a photo id or hash."""
    line = _first_line(path)
    if not line.strip():
        raise MetadataError(f"{path}: metadata file is empty")
    fields = next(csv.reader([line], delimiter=_csv_delimiter(line)), [""])
    if _find_column(fields, _IMAGE_ALIASES) is not None:
        return "csv"
    key = _split(line)[0].strip()
    if _is_photo_id(key) or (_HASH.match(key) and not key.isdigit()):
        return "yfcc"
    if key.lower() in _HEADER_WORDS:
        return "yfcc"
    return "csv"


def read_metadata(
    images_dir,
    metadata=None,
    from_exif: bool = False,
    fmt: str = "auto",
    allow_outside: bool = False,
) -> Result:
    """Read image positions from wherever they are.

    * ``from_exif=True`` (or ``fmt="exif"``): EXIF GPS of every image under ``images_dir``.
    * ``metadata`` a file: a CSV with an ``image,lat,lon`` header, or a Placing/YFCC100M file
      (detected from the first line, or forced with ``fmt="csv"``/``"yfcc"``). A pair
      ``(placing_file, yfcc_metadata_file)`` is read with :func:`read_yfcc_metadata`.
    * no ``metadata``: positions from VPR-style file names when most image names follow the
      convention (``fmt="vpr"`` forces it), else MetadataError asking for ``--metadata`` or
      ``--from-exif``.
    """
    fmt = _FORMAT_ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in FORMATS:
        raise MetadataError(f"unknown metadata format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = _check_images_dir(images_dir)
    if from_exif or fmt == "exif":
        if metadata is not None:
            raise MetadataError("give either a metadata file or --from-exif, not both")
        return read_exif_metadata(root, allow_outside=allow_outside)
    if metadata is not None:
        if isinstance(metadata, (tuple, list)):
            if len(metadata) != 2:
                raise MetadataError("metadata pair must be (placing_file, yfcc_metadata_file)")
            if fmt not in ("auto", "yfcc"):
                raise MetadataError(f"a pair of metadata files is read as yfcc, not {fmt}")
            return read_yfcc_metadata(metadata[0], metadata[1], root, allow_outside)
        path = Path(metadata)
        if not path.exists():
            raise MetadataError(f"{path}: metadata file not found")
        if path.is_dir():
            raise MetadataError(f"{path}: is a folder; --metadata takes a file")
        if fmt == "vpr":
            raise MetadataError(
                "VPR positions come from the file names; do not pass a metadata file"
            )
        kind = _sniff(path) if fmt == "auto" else fmt
        if kind == "csv":
            return read_csv_metadata(path, root, allow_outside=allow_outside)
        if len(_split(_first_line(path))) in (23, 24, 25):
            # the YFCC100M metadata itself: look up every image named by a photo id or hash
            return read_yfcc_metadata(None, path, root, allow_outside)
        return read_yfcc_metadata(path, None, root, allow_outside)
    files = _walk_images(root)
    if not files:
        raise MetadataError(f"{root}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if fmt == "vpr":
        return _vpr_from_files(root, files, allow_outside)
    n_vpr = sum(parse_vpr_fields(p.name) is not None for p in files)
    if fmt == "auto" and n_vpr * 2 > len(files):
        return _vpr_from_files(root, files, allow_outside)
    raise MetadataError(
        f"{root}: no metadata given and the image names do not encode positions "
        f"({n_vpr} of {len(files)} follow the VPR @utm_east@utm_north@zone@letter@lat@lon@ "
        "convention); pass --metadata FILE (a CSV with columns image,lat,lon) "
        "or --from-exif to read GPS from EXIF"
    )

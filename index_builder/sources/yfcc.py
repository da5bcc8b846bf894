"""MediaEval Placing task files (YFCC100M photo id, hash) with the YFCC100M metadata file, or Placing ``key,lat,lon`` tables."""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from pathlib import Path

from delg_geo.core.errors import MetadataError
from index_builder.sources.vpr import _float_or_none
from index_builder.sources.common import (
    GeoRecord,
    Result,
    Skipped,
    _check_images_dir,
    _open_text,
    _parse_latlon,
    _rel,
    _walk_images,
    outside_reason,
)


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



"""A CSV with columns ``image,lat,lon`` (aliases accepted; extra columns are kept)."""

from __future__ import annotations

import csv
import lzma
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from delg_geo.core.errors import MetadataError
from index_builder.sources.common import (
    GeoRecord,
    Result,
    Skipped,
    _IMAGE_ALIASES,
    _LAT_ALIASES,
    _LON_ALIASES,
    _check_images_dir,
    _csv_delimiter,
    _find_column,
    _first_line,
    _open_text,
    _parse_latlon,
    not_text_reason,
    outside_reason,
)


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
                    why = not_text_reason(Path(csv_path), delimiter.join(fields))
                    if why:
                        raise MetadataError(f"{csv_path}: not a CSV file (it is {why}); expected a text file "
                                            f"with columns {expected}")
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



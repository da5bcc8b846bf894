"""Benchmark query sets: which photos to geolocate, and where they were really taken.

:func:`read_queries` returns ``(items, skipped)``: one :class:`QueryItem` per usable query and one
:class:`~index_builder.sources.Skipped` per query that cannot be used (image missing, coordinates
missing or invalid, duplicate), with its line number and the reason. Queries are never dropped
silently: ``len(items) + len(skipped)`` accounts for every data row of the file. A file that
cannot be read at all raises :class:`~delg_geo.core.errors.MetadataError`.

Formats (``fmt``; ``"auto"`` picks one from the first line):

* ``"csv"`` -- a CSV with an ``image,lat,lon`` header (as ``venice/queries.csv``), read by
  :func:`index_builder.sources.read_csv_metadata`; ``img_id`` is the image path as written.
* ``"placing"`` -- the MediaEval Placing 2016 test list (tab-separated, column 0 the YFCC100M
  photo id, column 1 its hash) with the YFCC100M metadata rows for those ids (``yfcc_metadata``),
  and a folder of images named by photo id; read by
  :func:`index_builder.sources.read_yfcc_metadata`. ``img_id`` is the photo id.
* ``"im2gps"`` -- the Im2GPS / Im2GPS3k ground truth (``IMG_ID,AUTHOR,LAT,LON,...``, as published
  by TIBHannover/GeoEstimation), with the images, which are not distributed with it, in
  ``images_dir/IMG_ID``. ``img_id`` is ``IMG_ID``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from delg_geo.core.errors import MetadataError
from index_builder.sources import (
    _LAT_ALIASES,
    _LON_ALIASES,
    Skipped,
    _check_images_dir,
    _csv_delimiter,
    _find_column,
    _first_line,
    _parse_latlon,
    _sniff,
    iter_csv_rows,
    read_csv_metadata,
    read_yfcc_metadata,
    resolve_image_path,
)

__all__ = ["QueryItem", "Skipped", "QUERY_FORMATS", "detect_query_format", "read_queries"]

QUERY_FORMATS = ("auto", "csv", "placing", "im2gps")
_ALIASES = {
    "yfcc": "placing",
    "placing2016": "placing",
    "mediaeval": "placing",
    "im2gps3k": "im2gps",
    "geoestimation": "im2gps",
}
_IM2GPS_ID = ("img_id",)


@dataclass
class QueryItem:
    """One query photo and its true position (WGS84 degrees)."""

    img_id: str
    path: Path
    lat: float
    lon: float


def detect_query_format(queries_file) -> str:
    """``"im2gps"``, ``"csv"`` or ``"placing"``, from the first line of ``queries_file``."""
    path = Path(queries_file)
    if not path.exists():
        raise MetadataError(f"{path}: query file not found")
    if path.is_dir():
        raise MetadataError(f"{path}: is a folder; expected a query list file")
    line = _first_line(path)
    if not line.strip():
        raise MetadataError(f"{path}: query file is empty")
    fields = next(csv.reader([line], delimiter=_csv_delimiter(line)), [])
    if len(fields) < 2:  # _csv_delimiter prefers "," even for a tab-separated header
        fields = line.split("\t")
    if _find_column(fields, _IM2GPS_ID) is not None:
        return "im2gps"
    return "placing" if _sniff(path) == "yfcc" else "csv"


def read_queries(
    queries_file,
    images_dir=None,
    fmt: str = "auto",
    yfcc_metadata=None,
) -> tuple[list[QueryItem], list[Skipped]]:
    """Read a benchmark query set: ``(items, skipped)``, see the module docstring.

    ``images_dir`` holds the query images; for ``csv`` it defaults to the folder of
    ``queries_file`` (image paths are relative to it), the other formats need it.
    ``yfcc_metadata`` is the YFCC100M metadata file (``yfcc100m_dataset``, optionally
    compressed) giving the coordinates of a Placing test list.
    """
    kind = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if kind not in QUERY_FORMATS:
        raise MetadataError(
            f"unknown query format {fmt!r}; choose one of {', '.join(QUERY_FORMATS)}"
        )
    queries_file = Path(queries_file)
    if kind == "auto":
        kind = detect_query_format(queries_file)
    elif not queries_file.exists():
        raise MetadataError(f"{queries_file}: query file not found")
    if yfcc_metadata is not None and kind != "placing":
        raise MetadataError(
            f"{queries_file}: read as {kind}; yfcc_metadata only applies to a Placing test list"
        )
    if images_dir is None:
        if kind != "csv":
            raise MetadataError(
                f"{queries_file}: {kind} query images are not distributed with the list; "
                "pass the folder holding them (images_dir)"
            )
        images_dir = queries_file.parent
    if kind == "csv":
        records, skipped = read_csv_metadata(queries_file, images_dir)
        items = [QueryItem(r.image, r.path, r.lat, r.lon) for r in records]
        return items, skipped
    if kind == "placing":
        records, skipped = read_yfcc_metadata(queries_file, yfcc_metadata, images_dir)
        items = [
            QueryItem(_placing_id(r.extra) or r.image, r.path, r.lat, r.lon) for r in records
        ]
        return items, skipped
    return _read_im2gps(queries_file, images_dir)


def _placing_id(extra: dict) -> str:
    return extra.get("photo_id") or extra.get("hash") or ""


def _read_im2gps(csv_path: Path, images_dir) -> tuple[list[QueryItem], list[Skipped]]:
    """Im2GPS / Im2GPS3k ground truth: ``IMG_ID,AUTHOR,LAT,LON,...``; image at images_dir/IMG_ID."""
    root = _check_images_dir(images_dir)
    items: list[QueryItem] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    required = (("IMG_ID", _IM2GPS_ID), ("LAT", _LAT_ALIASES), ("LON", _LON_ALIASES))
    for start, get, _header, cols in iter_csv_rows(csv_path, required, "IMG_ID,AUTHOR,LAT,LON,...", ",", "query file"):
        img_id = get(cols["IMG_ID"])
        if not img_id:
            skipped.append(Skipped(start, "", "empty IMG_ID"))
            continue
        if img_id in seen:
            skipped.append(Skipped(start, img_id, f"duplicate IMG_ID (first listed on line {seen[img_id]})"))
            continue
        seen[img_id] = start
        ll, why = _parse_latlon(get(cols["LAT"]), get(cols["LON"]))
        if ll is None:
            skipped.append(Skipped(start, img_id, why))
            continue
        path, why = resolve_image_path(img_id, root)
        if path is None:
            skipped.append(Skipped(start, img_id, why))
            continue
        if not path.is_file():
            why = "not a file" if path.exists() else "image not found"
            skipped.append(Skipped(start, img_id, f"{why}: {path}"))
            continue
        items.append(QueryItem(img_id, path, ll[0], ll[1]))
    return items, skipped

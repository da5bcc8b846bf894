"""Where the coordinates of the images to index come from.

Every reader returns ``(records, skipped)``: a list of :class:`GeoRecord` (one per usable image)
and a list of :class:`Skipped` (one per unusable row or file, with the reason). Row-level
problems never raise; only a metadata file that cannot be read at all raises
:class:`~delg_geo.core.errors.MetadataError`.

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

import csv
from pathlib import Path

from delg_geo.core.errors import MetadataError
from index_builder.sources.common import (  # noqa: F401
    GeoRecord,
    IMAGE_EXTENSIONS,
    OUTSIDE_REASON,
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
    _parse_coord,
    _parse_latlon,
    _rel,
    _walk_images,
    outside_reason,
)
from index_builder.sources.csv_file import (  # noqa: F401
    _is_absolute,
    iter_csv_rows,
    read_csv_metadata,
    resolve_image_path,
)
from index_builder.sources.exif import (  # noqa: F401
    read_exif_metadata,
)
from index_builder.sources.vpr import (  # noqa: F401
    _GSV_CITIES,
    _UTM_LETTERS,
    _VPR_FIELDS,
    _float_or_none,
    _vpr_from_files,
    parse_vpr_fields,
    parse_vpr_filename,
    read_vpr_metadata,
    utm_to_latlon,
)
from index_builder.sources.yfcc import (  # noqa: F401
    _Entry,
    _FileFinder,
    _HASH,
    _HEADER_WORDS,
    _is_photo_id,
    _lookup_yfcc,
    _norm_hash,
    _read_placing_entries,
    _split,
    _yfcc_layout,
    read_yfcc_metadata,
)


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

"""GPS positions from each image's EXIF."""

from __future__ import annotations

from delg_geo.core.errors import ImageLoadError
from delg_geo.features.exif import read_exif_gps_reason
from index_builder.sources.common import (
    GeoRecord,
    Result,
    Skipped,
    _check_images_dir,
    _rel,
    _walk_images,
    outside_reason,
)


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



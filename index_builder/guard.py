"""Checks a writer makes before it deletes or writes anything: what ``--index`` points at, whether a
folder really is a delg-geo index; storage errors as one line come from :mod:`delg_geo.index.lock`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from delg_geo.core.errors import DelgGeoError
from delg_geo.index.geo_index import MANIFEST
from delg_geo.index.lock import storage_errors  # noqa: F401 (public here too)
from index_builder.work import BUILDING, REBUILD, STAGING, WORK_NAMES

#: Keys every delg-geo manifest has, whatever its format version.
MANIFEST_KEYS = ("model_id", "model_fingerprint", "num_images", "files")


def is_delg_geo_index(index_dir: Path) -> bool:
    """True when ``index_dir/manifest.json`` is a delg-geo manifest (a JSON object with the keys
    every delg-geo manifest has), not any file of that name."""
    try:
        d = json.loads((Path(index_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and all(k in d for k in MANIFEST_KEYS)


def holds_work(index_dir: Path) -> bool:
    """True when ``index_dir`` holds a delg-geo writer's work folders (an interrupted build)."""
    return any((Path(index_dir) / n).exists() for n in (BUILDING, STAGING, REBUILD))


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_index_target(images_dir: Path | None, index_dir: Path, *, overwrite: bool = False) -> None:
    """Refuse an ``--index`` that is a file, a symlink to be overwritten, the images folder or a
    folder inside or around it, or (with ``overwrite``) a folder that is not a delg-geo index."""
    index_dir = Path(index_dir)
    if index_dir.is_symlink() and overwrite:
        raise DelgGeoError(f"--index {index_dir} is a symbolic link (to {os.readlink(index_dir)}); --overwrite "
                           "does not replace through a link: give the real folder")
    if index_dir.exists() and not index_dir.is_dir():
        raise DelgGeoError(f"--index {index_dir} is a file, not a folder; give a folder for the index"
                           + (" (--overwrite never replaces a file)" if overwrite else ""))
    if images_dir is not None:
        img, idx = Path(images_dir).resolve(), index_dir.resolve()
        if _inside(img, idx):
            where = "is the images folder" if idx == img else "contains the images folder"
            raise DelgGeoError(
                f"--index {index_dir} {where} {images_dir}: an index keeps its own files apart from the photos, so that "
                "a rebuild can never delete a photo and the photos never pick up index files; choose a folder outside it")
    if overwrite and index_dir.is_dir() and any(index_dir.iterdir()):
        if not (is_delg_geo_index(index_dir) or holds_work(index_dir)):
            others = sorted(p.name for p in index_dir.iterdir() if p.name not in WORK_NAMES)[:3]
            raise DelgGeoError(
                f"--index {index_dir} is not a delg-geo index (no delg-geo manifest.json; it holds {', '.join(others)}"
                f"{', ...' if len(others) == 3 else ''}); --overwrite replaces only a delg-geo index: give an empty "
                "or new folder")


def check_index_apart(images_dir: Path, index_dir: Path, records, walked: bool) -> None:
    """An index inside the images folder is refused where the photos are found by walking the
    folder (``--from-exif``, VPR names: the walk would meet the index's files), and where a photo
    the metadata lists lies inside the index folder; a metadata file that lists photos elsewhere in
    the folder keeps them apart already."""
    img, idx = Path(images_dir).resolve(), Path(index_dir).resolve()
    if not _inside(idx, img):
        return
    why = ("the photos are found by walking that folder, and the walk would meet the index's files" if walked else None)
    if why is None:
        inside = next((r for r in records if _inside(Path(r.path).resolve(), idx)), None)
        if inside is not None:
            why = f"the photo {inside.image} lies inside the index folder"
    if why:
        raise DelgGeoError(
            f"--index {index_dir} lies inside the images folder {images_dir} and {why}; an index keeps its own files "
            "apart from the photos, so that a rebuild can never delete a photo: choose a folder outside it")


def clear_work(index_dir: Path) -> None:
    """Remove the work folders of an interrupted build (never anything else)."""
    for name in (BUILDING, STAGING, REBUILD):
        shutil.rmtree(Path(index_dir) / name, ignore_errors=True)

"""Moving a finished index into place: the files of a staging folder replace the index's, the
manifest last, under the swap lock (:mod:`delg_geo.index.lock`) so that no reader sees a mix.

A kill at any point leaves either the old manifest (nothing moved yet), no manifest and the
staging folder's manifest (the next writer finishes the move), or the new index.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from delg_geo.index.geo_index import MANIFEST
from delg_geo.index.lock import swapping
from index_builder.work import BUILDING, STAGING, WORK_NAMES, _kill_point

#: Files an index of any format may hold; those the new manifest does not list are removed.
_INDEX_FILES = {"global_raw.npy", "global.faiss", "global.npy", "local_descriptors.npy", "local_scores.npy",
                "local_codes.npy", "local_codec.npz", "local_keypoints.npy", "local_offsets.npy"}


def _listed(manifest_path: Path) -> set[str]:
    try:
        d = json.loads(manifest_path.read_text())
        files = d.get("files", {}) if isinstance(d, dict) else {}
        names = set(files) if isinstance(files, dict) else set()
        return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}
    except (OSError, ValueError):
        return set()


def swap_in(index_dir: Path, src: Path) -> None:
    """Move every file of ``src`` (a complete index) into ``index_dir``, remove the old index's
    files the new one does not have, then remove ``src``."""
    index_dir, src = Path(index_dir), Path(src)
    new = {p.name for p in src.iterdir() if p.name not in WORK_NAMES}
    with swapping(index_dir):
        old = _listed(index_dir / MANIFEST)
        (index_dir / MANIFEST).unlink(missing_ok=True)
        # files of the previous index that this one does not have (format 1 -> 2, a dropped global.faiss)
        for name in (old | _INDEX_FILES) - new:
            (index_dir / name).unlink(missing_ok=True)
        for name in sorted(new - {MANIFEST}):
            dst = index_dir / name
            if (src / name).is_dir() and dst.is_dir():
                shutil.rmtree(dst)
            os.replace(src / name, dst)
            _kill_point("swap")
        os.replace(src / MANIFEST, index_dir / MANIFEST)
        _kill_point("manifest")
    shutil.rmtree(src, ignore_errors=True)


def swap_staging(index_dir: Path) -> None:
    """Move the staged files into place; the manifest goes last, and only then is work removed."""
    swap_in(index_dir, Path(index_dir) / STAGING)
    _kill_point("staging-removed")
    shutil.rmtree(Path(index_dir) / BUILDING, ignore_errors=True)

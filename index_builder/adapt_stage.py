"""The last steps of ``index adapt``: the next version of the index, complete, in the work folder
(``INDEX_DIR/.adapt/next``), then moved into place.

The next version holds hard links to every file that does not change (metadata, local
features, the inverted file), and new global vectors, whitening, FAISS index (for a compressed
index), raw descriptors (where the index keeps them) and ``adapt.npz``; its manifest lists them
all with checksums. It is calibrated where it stands (where the index was calibrated), and only
then moved in with :func:`index_builder.swap.swap_in` (under the swap lock, manifest last). Until
then the index is untouched: a killed adapt leaves it as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from delg_geo.index.adapted_file import ADAPT_FILE
from delg_geo.index.geo_index import MANIFEST, Manifest, faiss_params, new_faiss, now_iso, read_manifest, write_atomic
from delg_geo.index.integrity import file_checksum
from index_builder.work import _kill_point

#: Files ``index adapt`` writes anew; every other file of the index is linked unchanged.
REPLACED = {"global.npy", "whitening.npz", "global.faiss", "global_raw.npy", ADAPT_FILE, "calibration.json"}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


def stage_index(index_dir: Path, next_dir: Path, m: Manifest, vectors: np.ndarray, whitening, whitening_info: dict,
                raw: np.ndarray | None, weights, adapt_info: dict, model_fingerprint: str, seed: int = 0, log=print) -> Manifest:
    """Write the next version of the index at ``next_dir`` (see the module docstring).
    ``vectors``: (N, d) whitened, L2-normalised global vectors; ``raw``: the model's new raw
    descriptors (None: unchanged)."""
    import faiss

    if next_dir.exists():
        shutil.rmtree(next_dir)
    next_dir.mkdir(parents=True)
    for name in m.files:
        if name not in REPLACED:
            _link(index_dir / name, next_dir / name)
    np.save(next_dir / "global.npy", np.asarray(vectors, np.float16))
    whitening.save(next_dir / "whitening.npz")
    if "global_raw.npy" in m.files:
        if raw is None:
            _link(index_dir / "global_raw.npy", next_dir / "global_raw.npy")
        else:
            np.save(next_dir / "global_raw.npy", np.asarray(raw, np.float32))
    search = dict(m.search)
    if m.index_type != "flat":  # the compressed index, trained again on the new vectors
        n, d = vectors.shape
        params = faiss_params(n, d, m.index_type)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, min(n, params.get("train_size", 50_000)), replace=False))
        log(f"adapt: training {m.index_type} on {len(take)} of {n} vectors")
        fidx = new_faiss(d, params, np.asarray(vectors[take], np.float32))
        for a in range(0, n, 100_000):
            fidx.add(np.asarray(vectors[a : a + 100_000], np.float16).astype(np.float32))
        faiss.write_index(fidx, str(next_dir / "global.faiss"))
        search.update(params)
    weights.save(next_dir / ADAPT_FILE)
    files = {p.name: p.stat().st_size for p in sorted(next_dir.iterdir()) if p.name != MANIFEST}
    checksums = {name: (m.checksums[name] if name not in REPLACED and name in m.checksums else file_checksum(next_dir / name))
                 for name in files}
    from delg_geo.index.crosscheck import file_stamp

    stamps = {name: (m.stamps[name] if name not in REPLACED and name in getattr(m, "stamps", {}) else
                     file_stamp(next_dir / name, m.build_id)) for name in files}
    new = replace(m, model_fingerprint=model_fingerprint, whitening=whitening_info, files=files, checksums=checksums,
                  stamps=stamps,
                  search=search, adapt=dict(adapt_info, file=ADAPT_FILE, digest=weights.digest(), kind=weights.kind,
                                            base_fingerprint=weights.base_fingerprint),
                  calibration={}, updated=now_iso())
    write_atomic(next_dir / MANIFEST, new.to_json())
    return new


def calibrate_next(next_dir: Path, old: Manifest, progress=False, log=print) -> dict | None:
    """Fit the next version's calibration as the index's own was fitted (none where it had none)."""
    from delg_geo.core.errors import DelgGeoError
    from delg_geo.retrieval.calibrate import DEFAULT_SAMPLE, calibrate_index

    if not old.calibration:
        return None
    try:
        cal = calibrate_index(next_dir, sample=int(old.calibration.get("sample") or DEFAULT_SAMPLE), progress=progress,
                              log=log, radius_km=old.confidence_radius_km)
    except DelgGeoError as e:
        log(f"adapt: not calibrated: {e}")
        return None
    _kill_point("adapt-calibrated")
    return dict(radius_km=cal.radius_km, rule=cal.rule.to_dict(), **cal.stats)


def commit(index_dir: Path, next_dir: Path, work: Path) -> Manifest:
    """Move the next version into place (manifest last), then remove the work folder."""
    from index_builder.swap import swap_in

    _kill_point("adapt-commit")
    swap_in(index_dir, next_dir)
    shutil.rmtree(work, ignore_errors=True)
    return read_manifest(index_dir)

"""Integrity of an index on disk: content checksums, value ranges, damaged candidates.

* **Checksums.** The build records ``xxh3_128`` of every file the manifest lists (xxHash's 128-bit
  XXH3, many times faster than SHA-256: docs/results.md); it detects damage, which is what it is for, not deliberate tampering, since whoever can edit the files can edit the
  manifest too). ``delg-geo index verify`` checks them all; opening an index for ``query`` or
  ``serve`` checks ``metadata.csv`` and every file up to :data:`CHEAP_CHECK_BYTES` (the large
  local-feature store is checked per candidate instead).
* **Value ranges.** Coordinates and image sizes in ``metadata.csv`` (:func:`check_metadata`).
* **Global index.** A sample of the vectors FAISS holds is compared with the stored descriptors.
* **Candidates.** Each candidate's local features are checked before verification
  (:func:`local_features_problem`): non-finite or out-of-image keypoints, non-finite
  descriptors, or descriptor norms far from the index's own. A damaged candidate is skipped with a
  note in the prediction; it never silently moves an answer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from delg_geo.core.errors import IndexFormatError

CHECKSUM_ALGO = "xxh3_128"
#: Files up to this size are checksummed each time an index is opened for querying.
CHEAP_CHECK_BYTES = 64 * 1024 * 1024
_CHUNK = 8 << 20


def file_checksum(path: str | Path, algo: str = CHECKSUM_ALGO) -> str:
    """``"ALGO:hex"`` of the file's bytes (streamed)."""
    if algo == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    elif algo in hashlib.algorithms_available:
        h = hashlib.new(algo)
    else:
        raise IndexFormatError(f"unknown checksum algorithm {algo!r}")
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return f"{algo}:{h.hexdigest()}"


STAMP_ALGO = "xxh3_128s"  # "s": sampled
STAMP_BLOCKS = 16
STAMP_BLOCK = 4096


def file_stamp(path: str | Path, build_id: str) -> str:
    """The stamp of a file: ``"xxh3_128s:hex"``, a digest of ``build_id``, the file's size and
    :data:`STAMP_BLOCKS` blocks of :data:`STAMP_BLOCK` bytes spread through it (the first and the last
    included). It reads 64 KB whatever the size; a file from another build fails it (see crosscheck.py)."""
    import xxhash

    path = Path(path)
    size = path.stat().st_size
    h = xxhash.xxh3_128()
    h.update(f"{build_id}:{size}:".encode())
    starts = np.unique(np.linspace(0, max(0, size - STAMP_BLOCK), STAMP_BLOCKS).astype(np.int64))
    fd = os.open(path, os.O_RDONLY)
    try:
        for s in starts:
            h.update(os.pread(fd, STAMP_BLOCK, int(s)))
    finally:
        os.close(fd)
    return f"{STAMP_ALGO}:{h.hexdigest()}"


def file_problem(index_dir: Path, name: str, size: int | None, checksum: str | None, full: bool = True,
                 stamp: str | None = None, build_id: str = "") -> str | None:
    """Why file ``name`` of the index does not match the manifest, or None: missing, not a plain
    file inside the index folder, another size, or content that does not match its checksum.
    ``full=False`` skips the checksum of files larger than :data:`CHEAP_CHECK_BYTES`
    (``metadata.csv`` is always summed); their ``stamp`` (``crosscheck.file_stamp`` of
    ``build_id``), when recorded, is checked instead."""
    from delg_geo.index.manifest_schema import describe, name_problem, outside_problem, whole

    why = name_problem(name)
    if why:
        return why
    p = Path(index_dir) / name
    why = outside_problem(index_dir, name)
    if why:
        return why
    if not p.exists():
        return "missing"
    if not p.is_file():
        return "is not a file"
    actual = p.stat().st_size
    if size is not None and not whole(size):
        return f"has {actual} bytes, and the manifest records {describe(size)}, not a number of bytes"
    if size is not None and actual != size:
        return f"has {actual} bytes, the manifest says {size}"
    if checksum and (full or name == "metadata.csv" or actual <= CHEAP_CHECK_BYTES):
        algo = checksum.split(":", 1)[0]
        got = file_checksum(p, algo)
        if got != checksum:
            return f"content does not match its checksum ({algo})"
    elif stamp:
        if file_stamp(p, build_id) != stamp:
            return "content does not match its stamp (sampled blocks): a file from another build, or damaged"
    return None


def damaged_message(index_dir, name: str, why: str) -> str:
    return (f"damaged index {index_dir}: {name} {why}; check every file with `delg-geo index verify "
            f"--index {index_dir}`, then rebuild the index or restore it from a backup")


def check_metadata(md, where: str | Path, columns=None) -> None:
    """Refuse a metadata table with missing columns, or coordinates or sizes that are not numbers
    in range: raises :class:`IndexFormatError` naming the file, the first bad line (the header
    is line 1) and the value. ``columns``: the file's header, when ``md`` holds only some of them."""
    import pandas as pd

    have = md.columns if columns is None else columns
    missing = [c for c in ("image", "path", "lat", "lon", "width", "height") if c not in have]
    if missing:
        raise IndexFormatError(f"damaged index: {where} lacks the column(s) {', '.join(missing)}; rebuild the index")
    checks = (("lat", -90.0, 90.0, "a latitude"), ("lon", -180.0, 180.0, "a longitude"),
              ("width", 1, 1_000_000, "an image width"), ("height", 1, 1_000_000, "an image height"))
    for col, lo, hi, what in checks:
        v = pd.to_numeric(md[col], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(v) | (v < lo) | (v > hi)
        if col in ("width", "height"):
            bad |= np.isfinite(v) & (v != np.round(v))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IndexFormatError(
                f"damaged index: {where} line {i + 2}: {md[col].iloc[i]!r} in column {col} is not {what} "
                f"in [{lo}, {hi}] ({int(bad.sum())} bad row(s)); rebuild the index, or check it with "
                "`delg-geo index verify`"
            )


# -- local features --------------------------------------------------------------------------------

def reference_norm(local_features, n: int, samples: int = 16) -> float:
    """The typical local-descriptor norm of an index: the median over up to ``samples`` images
    spread through it (a few damaged ones cannot move it)."""
    if n == 0:
        return 1.0
    meds = []
    for i in np.unique(np.linspace(0, n - 1, min(n, samples)).astype(int)):
        _, d = local_features(int(i))
        if len(d):
            norms = np.linalg.norm(np.asarray(d, np.float64), axis=1)
            norms = norms[np.isfinite(norms)]
            if len(norms):
                meds.append(float(np.median(norms)))
    return float(np.median(meds)) if meds else 1.0


def local_features_problem(kp: np.ndarray, desc: np.ndarray, size: tuple[int, int], norm_ref: float = 1.0) -> str | None:
    """Why one image's local features cannot be trusted, or None.

    Checked: equal counts, finite keypoints inside the image (with a margin), finite descriptors
    whose norms lie within a factor of three of ``norm_ref``.
    """
    if len(kp) != len(desc):
        return f"{len(kp)} keypoints but {len(desc)} descriptors"
    if len(kp) == 0:
        return None
    kp = np.asarray(kp)
    lo, hi = kp.min(axis=0), kp.max(axis=0)  # NaN propagates into both
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return "non-finite keypoints"
    w, h = size
    m = 0.05 * max(w, h) + 16
    if lo.min() < -m or hi[0] > w + m or hi[1] > h + m:
        return f"keypoints outside the {w}x{h} image"
    d = np.asarray(desc)
    sq = np.einsum("ij,ij->i", d, d, dtype=np.float32)  # NaN and inf propagate; huge values overflow to inf
    if not np.isfinite(sq).all():
        return "non-finite local descriptors"
    bad = (sq < (norm_ref / 3) ** 2) | (sq > (norm_ref * 3) ** 2)
    if bad.any():
        n = np.sqrt(sq)
        return f"local descriptor norms {n.min():.3g}..{n.max():.3g}, the index's are about {norm_ref:.3g}"
    return None


# -- the global index -------------------------------------------------------------------------------

def faiss_problem(cpu_index, search_dim: int, raw_path: Path | None, whitening, samples: int = 16) -> str | None:
    """Why the FAISS index does not hold this index's vectors, or None: its dimension, finite
    vectors of unit length, and (when ``global_raw.npy`` is kept and the index type can
    reconstruct) a sample of vectors equal to the whitened stored descriptors."""
    if cpu_index.d != search_dim:
        return f"has dimension {cpu_index.d}, the manifest says {search_dim}"
    n = cpu_index.ntotal
    if n == 0:
        return None
    ids = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64))
    try:
        vecs = np.stack([cpu_index.reconstruct(int(i)) for i in ids])
    except RuntimeError:  # IVF-PQ without a direct map: one search instead
        return None
    if not np.isfinite(vecs).all():
        return "holds non-finite vectors"
    if raw_path is not None and raw_path.exists():
        raw = np.load(raw_path, mmap_mode="r")
        if len(raw) != n:
            return f"holds {n} vectors, global_raw.npy {len(raw)}"
        want = whitening.apply(np.asarray(raw[ids], np.float32))
        tol = 0.05 if cpu_index.__class__.__name__.startswith(("IndexFlat", "IndexHNSWFlat")) else 0.5
        err = np.abs(vecs - want).max()
        if not err <= tol:
            return f"holds vectors that differ from the stored descriptors (max difference {err:.3g})"
    else:
        norms = np.linalg.norm(vecs, axis=1)
        if (np.abs(norms - 1) > 0.1).any():
            return "holds vectors that are not unit length"
    return None

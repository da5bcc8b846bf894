"""Cheap checks that an index's files belong together: what catches a file swapped in from another
index of the same size when no checksum is read.

A query checksums only the files up to ``integrity.CHEAP_CHECK_BYTES`` when it opens an index, and
an index built before delg-geo recorded checksums has none at all. Opening an index therefore also:

* **Stamps.** The build records, per file, a *stamp* (``integrity.file_stamp``): an ``xxh3_128``
  digest of the build id, the file's size and 16 blocks of 4 KB spread through the file (the
  first and the last included). Checking one reads 64 KB, whatever the file's size, and a file
  from another build (other descriptors in every block) fails it. Files too large to be
  checksummed on open are checked by their stamp (``integrity.file_problem``).
* **Global vectors against FAISS** (:func:`global_problem`). A compressed index (IVF-PQ, HNSW)
  must find a sample of the stored vectors (``global.npy``) among its own nearest neighbours of
  them: vectors from another index are not in its lists. (An exact index is built from
  ``global.npy`` when it opens, so there is nothing to compare; ``global_raw.npy``, when kept, is
  compared instead: ``integrity.faiss_problem``.)
* **Local features against the inverted file** (:func:`asmk_problem`). A few images' stored local
  features (``local_codes.npy``) are aggregated again with the index's codebook; the inverted
  file must hold those images under the same words (``asmk_ids.npy``) with the same signatures
  (``asmk_sigs.npy``), and ``asmk_counts.npy`` must count as many words.

``delg-geo index verify`` reads every byte on top of these.
"""

from __future__ import annotations

import numpy as np

from delg_geo.index.integrity import file_stamp  # noqa: F401 (the stamps, checked here too)

#: below these shares of agreeing samples, the files are reported as not belonging together (a
#: rare tie in a word assignment or a compressed vector must not fail a sound index)
MIN_AGREEMENT = 0.8


def _spread(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(0, n - 1), min(n, k)).astype(np.int64))


def global_problem(cpu_index, stored, samples: int = 8) -> str | None:
    """Why the stored vectors ``stored`` (``global.npy``, rows indexable by sorted ids) are not the
    ones the compressed FAISS index ``cpu_index`` holds, or None (see the module docstring)."""
    import faiss

    n = int(cpu_index.ntotal)
    if n == 0 or len(stored) != n:
        return None  # the counts are compared where the index opens
    ids = _spread(n, samples)
    q = np.ascontiguousarray(np.asarray(stored[ids], np.float32))
    if not np.isfinite(q).all():
        return "holds non-finite vectors"
    ivf = faiss.try_extract_index_ivf(cpu_index)
    nprobe = ivf.nprobe if ivf is not None else None
    if ivf is not None:  # a stored vector lies in its nearest list: a few lists find it
        ivf.nprobe = int(min(nprobe, 4))
    try:
        _, found = cpu_index.search(q, int(min(n, 10)))
    finally:
        if ivf is not None:
            ivf.nprobe = nprobe
    hits = sum(int(i in row) for i, row in zip(ids, found))
    if hits < MIN_AGREEMENT * len(ids):
        return (f"does not match global.faiss: the FAISS index finds {hits} of {len(ids)} sampled stored vectors "
                "among their own neighbours (one of the two files is from another index, or damaged)")
    return None


def asmk_problem(asmk, local_features, n: int, samples: int = 4, words: int = 16,
                 damaged=None) -> tuple[str, str] | None:
    """``(file, why)`` when the inverted file ``asmk`` (an :class:`~delg_geo.index.asmk.InvertedFile`)
    does not hold what the stored local features say (``local_features(i)`` -> keypoints,
    decoded descriptors), or None. Reads ``words`` of the shortest posting lists of each of
    ``samples`` images spread through the index. An image whose features ``damaged(i, kp, desc)``
    finds damaged is left out: a query skips such a candidate, and ``index verify`` lists it."""
    from delg_geo.index.asmk import aggregate

    if int(asmk.counts.sum()) != len(asmk.ids):
        return "asmk_counts.npy", f"counts {int(asmk.counts.sum())} entries, the inverted file holds {len(asmk.ids)}"
    picked, descs = [], []
    for i in _spread(n, samples):
        kp, desc = local_features(int(i))
        if len(desc) and not (damaged is not None and damaged(int(i), kp, desc)):
            picked.append(int(i))
            descs.append(desc)
    if not picked:
        return None
    # one word assignment for all the sampled images (entries sorted by image, then word)
    img, words_all, sigs_all = aggregate(asmk.codebook, np.concatenate(descs),
                                         image=np.repeat(np.arange(len(picked)), [len(x) for x in descs]))
    checked = found = same = right_count = 0
    for k, i in enumerate(picked):
        w, sig = words_all[img == k], sigs_all[img == k]
        right_count += int(asmk.counts[i] == len(w))
        lengths = asmk.offsets[w + 1] - asmk.offsets[w]
        for j in np.argsort(lengths, kind="stable")[:words]:
            a, b = int(asmk.offsets[w[j]]), int(asmk.offsets[w[j] + 1])
            ids = asmk.ids.rows(a, b)
            if len(ids) and int(ids.max()) >= n:
                return "asmk_ids.npy", f"holds image id {int(ids.max())}, beyond the {n} images"
            pos = np.flatnonzero(ids == i)
            checked += 1
            if len(pos):
                found += 1
                p = a + int(pos[0])
                same += int(np.array_equal(asmk.sigs.rows(p, p + 1)[0], sig[j]))
    counted = len(picked)
    pair = "local_codes.npy", "(as local_codec.npz decodes it) and the inverted file's {} disagree: {} ({})"
    why = "one of them is from another index, or damaged"
    if checked and found < MIN_AGREEMENT * checked:
        return pair[0], pair[1].format("asmk_ids.npy", f"{checked - found} of {checked} sampled (image, word) "
                                                       "entries are missing from it", why)
    if found and same < MIN_AGREEMENT * found:
        return pair[0], pair[1].format("asmk_sigs.npy", f"{found - same} of {found} sampled signatures differ", why)
    if counted and right_count < MIN_AGREEMENT * counted:
        return ("asmk_counts.npy", f"does not match local_codes.npy: {counted - right_count} of {counted} sampled "
                "images have another number of words")
    return None


def index_problem(index, cpu_index) -> tuple[str, str] | None:
    """``(file, why)`` of the first cross-check an opened :class:`~delg_geo.index.geo_index.GeoIndex`
    fails (``cpu_index``: its FAISS index before any move to a GPU), or None."""
    m = index.manifest
    if int(index.offsets[-1]) != m.num_local_features:
        return "local_offsets.npy", f"counts {int(index.offsets[-1])} local features, the manifest {m.num_local_features}"
    rows = getattr(index, "_refine_rows", None)
    if rows is not None:  # a compressed index over global.npy
        why = global_problem(cpu_index, rows)
        if why:
            return "global.npy", why
    if index.asmk is not None:
        return asmk_problem(index.asmk, index.local_features, len(index), damaged=index.candidate_problem)
    return None

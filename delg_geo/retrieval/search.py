"""Stage 3 — search: nearest neighbours of a query's global descriptor in the FAISS index, and the
shortlist verification checks: those, plus the local-feature inverted file's own top-k
(:func:`shortlist`, delg_geo/index/asmk.py) where the index has one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delg_geo.index.geo_index import GeoIndex


@dataclass
class Candidates:
    ids: np.ndarray  # (k,) int64 indexed-image ids, best first
    similarities: np.ndarray  # (k,) float32 cosine similarity of whitened descriptors


def search(index: GeoIndex, global_descriptors: np.ndarray, k: int = 100) -> list[Candidates]:
    """Top-``k`` candidates for each row of ``global_descriptors`` (raw, as the model gives them)."""
    q = index.whitening.apply(np.atleast_2d(global_descriptors))
    k = max(1, min(int(k), len(index)))
    sims, ids = index.search_whitened(q, k)
    return [_checked(index, s, i) for s, i in zip(sims, ids)]


def _checked(index: GeoIndex, sims: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None = None) -> Candidates:
    """One query's FAISS answer without padding (-1: an approximate index found fewer than k) or
    ``exclude``d ids; an answer out of range means a damaged index."""
    keep = ids >= 0
    if exclude is not None and len(exclude):
        keep &= ~np.isin(ids, exclude)
    if (ids[keep] >= len(index)).any() or not np.isfinite(sims[keep]).all():
        from delg_geo.core.errors import IndexFormatError
        from delg_geo.index.integrity import damaged_message

        raise IndexFormatError(damaged_message(index.path, "global.faiss", "returned ids or similarities out of range"))
    return Candidates(ids=ids[keep].astype(np.int64), similarities=sims[keep].astype(np.float32))


def shortlist(index: GeoIndex, q_whitened: np.ndarray, local: np.ndarray | None, k: int, k_local: int,
              exclude: np.ndarray | None = None) -> Candidates:
    """The candidates to verify for one query: the global top-``k`` (its whitened descriptor,
    (1, d)), then the ASMK top-``k_local`` of its local descriptors (in the store's matching space)
    that the global search did not return, with their global similarities. ``exclude``: ids left
    out of both (a self-query's near-duplicates)."""
    exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    want = max(1, min(int(k) + len(exclude), len(index)))
    sims, ids = index.search_whitened(np.ascontiguousarray(q_whitened, np.float32).reshape(1, -1), want)
    g = _checked(index, sims[0], ids[0], exclude)
    g_ids, g_sims = g.ids[:k], g.similarities[:k]
    extra = local_candidates(index, q_whitened, local, k_local, np.concatenate([exclude, g_ids]))
    return Candidates(np.concatenate([g_ids, extra.ids]), np.concatenate([g_sims, extra.similarities]))


def local_candidates(index: GeoIndex, q_whitened: np.ndarray, local: np.ndarray | None, k_local: int,
                     exclude: np.ndarray | None = None) -> Candidates:
    """The ASMK top-``k_local`` of a query's local descriptors, ``exclude`` left out, with their
    global similarities to ``q_whitened``; none where the index has no inverted file."""
    asmk = getattr(index, "asmk", None)
    if asmk is None or k_local <= 0 or local is None or len(local) == 0:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32))
    ids, _ = asmk.search(local, int(k_local), exclude=exclude)
    sims = index.global_rows(ids) @ np.asarray(q_whitened, np.float32).reshape(-1) if len(ids) else np.zeros(0)
    return Candidates(ids.astype(np.int64), np.asarray(sims, np.float32))

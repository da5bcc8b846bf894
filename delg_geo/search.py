"""Stage 3 — search: nearest neighbours of a query's global descriptor in the FAISS index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .index import GeoIndex


@dataclass
class Candidates:
    ids: np.ndarray  # (k,) int64 indexed-image ids, best first
    similarities: np.ndarray  # (k,) float32 cosine similarity of whitened descriptors


def search(index: GeoIndex, global_descriptors: np.ndarray, k: int = 100) -> list[Candidates]:
    """Top-``k`` candidates for each row of ``global_descriptors`` (raw, as the model gives them)."""
    q = index.whitening.apply(np.atleast_2d(global_descriptors))
    k = max(1, min(int(k), len(index)))
    sims, ids = index.search_whitened(q, k)
    out = []
    for s, i in zip(sims, ids):
        keep = i >= 0  # -1: an approximate index found fewer than k
        if (i[keep] >= len(index)).any() or not np.isfinite(s[keep]).all():
            from .errors import IndexFormatError
            from .integrity import damaged_message

            raise IndexFormatError(damaged_message(index.path, "global.faiss", "returned ids or similarities out of range"))
        out.append(Candidates(ids=i[keep].astype(np.int64), similarities=s[keep].astype(np.float32)))
    return out

"""The first stage of a benchmark: each query's features, global neighbours and verified
candidates (:func:`query_candidates`), computed once and shared by every method; with Ray the
shards run on workers (:mod:`delg_geo.evaluation.ray_bench`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError


@dataclass
class QueryCandidates:
    """Stage 1 for a run of queries: global descriptors, candidates and inlier counts.

    Per usable query (in query-file order): its position in the query list, global descriptor,
    candidate ids and similarities (best first, ``-1``/NaN padding past what the index holds),
    the candidates the ASMK inverted file adds (``extra_ids``/``extra_sims``, same padding; no
    columns where the index has none or nothing was verified), inlier counts for the first
    ``verify_k`` candidates then for the extra ones, and its seconds of extraction, search and
    verification. ``failed`` lists the queries whose image could not be used: ``(position, reason)``.
    """

    positions: np.ndarray  # (n,) int64
    global_desc: np.ndarray  # (n, G) float32; (n, 0) where not kept
    ids: np.ndarray  # (n, K) int64
    sims: np.ndarray  # (n, K) float32
    inliers: np.ndarray  # (n, verify_k + L) int32
    extract_s: np.ndarray  # (n,)
    search_s: np.ndarray  # (n,)
    verify_s: np.ndarray  # (n,)
    failed: list = field(default_factory=list)
    extra_ids: np.ndarray | None = None  # (n, L) int64: the ASMK inverted file's additions
    extra_sims: np.ndarray | None = None  # (n, L) float32

    FIELDS = ("positions", "global_desc", "ids", "sims", "inliers", "extract_s", "search_s", "verify_s",
              "extra_ids", "extra_sims")

    def __post_init__(self):
        n = len(self.positions)
        if self.extra_ids is None:
            self.extra_ids = np.full((n, 0), -1, np.int64)
        if self.extra_sims is None:
            self.extra_sims = np.full((n, 0), np.nan, np.float32)

    def save(self, path: Path) -> None:
        """Plain arrays in one ``.npz``, written to a temporary name and renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.FIELDS},
                 failed_pos=np.array([f[0] for f in self.failed], np.int64),
                 failed_reason=np.array([f[1] for f in self.failed], dtype=str))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "QueryCandidates":
        with np.load(path, allow_pickle=False) as z:
            failed = [(int(p), str(r)) for p, r in zip(z["failed_pos"], z["failed_reason"])]
            return cls(**{k: z[k] for k in cls.FIELDS if k in z.files}, failed=failed)

    @classmethod
    def concat(cls, parts: list["QueryCandidates"]) -> "QueryCandidates":
        """One record of several, ordered by query position."""
        parts = [p for p in parts if len(p.positions) or p.failed]
        if not parts:
            raise DelgGeoError("no query image could be read")
        width = max(p.ids.shape[1] for p in parts)
        extra = max(p.extra_ids.shape[1] for p in parts)
        verified = max(p.inliers.shape[1] - p.extra_ids.shape[1] for p in parts)

        def pad(a, fill, w=None):
            w = width if w is None else w
            return np.concatenate([a, np.full((len(a), w - a.shape[1]), fill, a.dtype)], axis=1)

        def inliers(p):  # the global columns, then the extra ones, each padded to the widest
            e = p.extra_ids.shape[1]
            g = p.inliers[:, : p.inliers.shape[1] - e]
            return np.concatenate([pad(g, 0, verified), pad(p.inliers[:, g.shape[1]:], 0, extra)], axis=1)

        pos = np.concatenate([p.positions for p in parts])
        order = np.argsort(pos, kind="stable")
        out = cls(
            positions=pos[order],
            global_desc=np.concatenate([p.global_desc for p in parts])[order],
            ids=np.concatenate([pad(p.ids, -1) for p in parts])[order],
            sims=np.concatenate([pad(p.sims, np.nan) for p in parts])[order],
            inliers=np.concatenate([inliers(p) for p in parts])[order],
            extract_s=np.concatenate([p.extract_s for p in parts])[order],
            search_s=np.concatenate([p.search_s for p in parts])[order],
            verify_s=np.concatenate([p.verify_s for p in parts])[order],
            failed=sorted(f for p in parts for f in p.failed),
            extra_ids=np.concatenate([pad(p.extra_ids, -1, extra) for p in parts])[order],
            extra_sims=np.concatenate([pad(p.extra_sims, np.nan, extra) for p in parts])[order],
        )
        return out

    def candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        keep = self.ids[i] >= 0
        return self.ids[i][keep], self.sims[i][keep]

    def verified(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, similarities, inliers) of query ``i``'s verified candidates: the global top
        ``k``, then the inverted file's additions."""
        ids, sims = (a[:k] for a in self.candidates(i))
        e = self.extra_ids.shape[1]
        nv = self.inliers.shape[1] - e
        keep = self.extra_ids[i] >= 0
        return (np.concatenate([ids, self.extra_ids[i][keep]]), np.concatenate([sims, self.extra_sims[i][keep]]),
                np.concatenate([self.inliers[i, : min(len(ids), nv)], self.inliers[i, nv:][keep]]))


def query_candidates(geo, paths: list[str], positions: list[int], search_k: int, verify_k: int,
                     threads: int | None = None, bar=None, keep_global: bool = True) -> QueryCandidates:
    """Stage 1 for one shard of queries: extract (batched), search, verify the top ``verify_k``.

    ``keep_global=False`` leaves the global descriptors out of the record (only the classifier
    and hybrid methods need them; at 1280-D float32 they are most of a query's record)."""
    from delg_geo.features.extract import iter_extract
    from delg_geo.retrieval.search import search

    t0 = time.perf_counter()
    feats, pos, failed = [], [], []
    for res in iter_extract(paths, geo.extractor, net_workers=threads):
        if res.ok:
            feats.append(res.features)
            pos.append(positions[res.index])
        else:
            failed.append((positions[res.index], res.error))
            if bar is not None:
                bar.update(1)
    n = len(feats)
    extract_s = (time.perf_counter() - t0) / max(n, 1)
    dim = int(geo.index.manifest.global_dim)
    G = np.stack([f.global_descriptor for f in feats]).astype(np.float32) if n else np.zeros((0, dim), np.float32)
    k = max(1, min(int(search_k), len(geo.index)))
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), np.nan, np.float32)
    t0 = time.perf_counter()
    for i, c in enumerate(search(geo.index, G, k) if n else []):
        ids[i, : len(c.ids)], sims[i, : len(c.ids)] = c.ids, c.similarities
    search_s = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    from delg_geo.retrieval.search import local_candidates

    n_extra = int(geo.config.local_top_k) if verify_k and getattr(geo.index, "asmk", None) is not None else 0
    extra_ids = np.full((n, n_extra), -1, np.int64)
    extra_sims = np.full((n, n_extra), np.nan, np.float32)
    inl = np.zeros((n, verify_k + n_extra), np.int32)
    verify_s = np.zeros(n)
    vc = geo.config.verify_config
    qw = geo.index.whitening.apply(G) if n_extra else None  # as search() whitened them
    for i, f in enumerate(feats):
        t = time.perf_counter()
        if verify_k:
            c = ids[i, :verify_k]
            c = c[c >= 0]
            q_local = geo.index.query_local(f.local_descriptors[: vc.max_features])
            inl[i, : len(c)] = geo.verify_candidates(f, c, q_local)
            if n_extra:  # the inverted file's own candidates (search time, then verification)
                t_s = time.perf_counter()
                ex = local_candidates(geo.index, qw[i], q_local, n_extra, exclude=c)
                dt = time.perf_counter() - t_s
                search_s[i] += dt
                t += dt  # counted as search, not verification
                m = len(ex.ids)
                extra_ids[i, :m], extra_sims[i, :m] = ex.ids, ex.similarities
                inl[i, verify_k : verify_k + m] = geo.verify_candidates(f, ex.ids, q_local)
        verify_s[i] = time.perf_counter() - t
        feats[i] = None  # local features are needed no longer
        if bar is not None:
            bar.update(1)
    return QueryCandidates(np.array(pos, np.int64), G if keep_global else G[:, :0], ids, sims, inl,
                           np.full(n, extract_s), search_s, verify_s, failed, extra_ids, extra_sims)


def save_candidates(path: Path, rows: list[tuple], top_k: int) -> None:
    """Every verified query's candidates as plain arrays (no pickle), for diagnosis.

    ``img_id`` (N,), and (N, top_k) arrays ``ids`` (index ids, -1 as padding), ``similarities``
    and ``inliers``. ``tools/diagnose_bench.py`` reads it.
    """
    n = len(rows)
    ids = np.full((n, top_k), -1, np.int64)
    sims = np.full((n, top_k), np.nan, np.float32)
    inl = np.zeros((n, top_k), np.int32)
    for i, (_img, c_ids, c_sims, c_inl) in enumerate(rows):
        k = min(top_k, len(c_ids))
        ids[i, :k], sims[i, :k], inl[i, :k] = c_ids[:k], c_sims[:k], c_inl[:k]
    np.savez(path, img_id=np.array([str(r[0]) for r in rows]), ids=ids, similarities=sims, inliers=inl)

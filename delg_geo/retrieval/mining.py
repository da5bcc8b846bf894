"""Training pairs mined from an index itself, with no labels but the geotags (``index adapt``).

Each mined photo is searched as a query is (:func:`delg_geo.retrieval.search.shortlist`: the
global top-k plus the inverted file's own), from its stored features, its near-duplicates left
out as calibration leaves them out (:func:`delg_geo.retrieval.calibrate.near_duplicates`), and
its candidates are verified with the index's stored local features
(:func:`delg_geo.retrieval.verify.verify_pair`):

* every candidate within the confidence radius is verified: those with at least
  ``min_inliers`` inliers are **positives** (the pair is kept once, with the larger of its two
  inlier counts when both photos were mined);
* of the candidates at least ``negative_km`` away, the ``verify_far`` most similar ones are
  verified: those with fewer than ``negative_inliers`` (they do not verify) are **hard
  negatives** (globally alike, far apart); those that do verify (a landmark seen from afar, a
  wrong geotag) are kept apart from both lists;
* candidates in between are neither, and are not verified.

**Places** are the connected groups of photos that positives join. Everything here is a pure
function of the index and the photo: mined in any order, on any worker, the rows are the same.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.geo import haversine_km
from delg_geo.retrieval.confidence import LeaveOut

SEED = 0  # RANSAC's seed: a pair gets the same inliers whoever mines it
NOT_VERIFIED = -2  # a candidate mining did not verify (neither near nor among the far ones checked)
#: The fewest places (groups of at least two photos that verify each other) worth training on.
MIN_PLACES = 20


@dataclass(frozen=True)
class MiningConfig:
    top_k: int = 100  # global candidates per photo, as a query gets
    local_top_k: int | None = None  # the inverted file's candidates (None: as many as top_k)
    radius_km: float | None = None  # positives lie within this (None: the index's confidence radius)
    negative_km: float = 0.3  # hard negatives lie at least this far
    min_inliers: int | None = None  # a positive verifies with this many (None: the stricter of the index's
    # calibrated rule and its local type's default: training wants sure positives)
    negative_inliers: int | None = None  # a hard negative has fewer (None: the calibrated rule's, else the default)
    verify_far: int = 20  # far candidates verified per photo (the most similar ones)
    leave_out: LeaveOut = field(default_factory=LeaveOut)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["leave_out"] = self.leave_out.to_dict()
        return d


def resolve(index, cfg: MiningConfig) -> MiningConfig:
    """``cfg`` with the index's radius and inlier threshold filled in where left to the index."""
    from dataclasses import replace

    from delg_geo.retrieval.calibrate import query_settings
    from delg_geo.retrieval.confidence import load_index_calibration

    radius = cfg.radius_km if cfg.radius_km is not None else float(index.manifest.confidence_radius_km)
    cal = load_index_calibration(index)
    default = query_settings(index)[1].min_inliers
    rule = cal.rule.min_inliers if cal is not None else default
    min_inl = cfg.min_inliers if cfg.min_inliers is not None else max(rule, default)
    neg_inl = cfg.negative_inliers if cfg.negative_inliers is not None else rule
    local_k = cfg.top_k if cfg.local_top_k is None else cfg.local_top_k
    return replace(cfg, radius_km=float(radius), min_inliers=int(min_inl), negative_inliers=int(neg_inl),
                   local_top_k=int(local_k))


@dataclass
class MinedRows:
    """Mined photos' shortlists, flat: photo ``query_ids[r]`` owns ``offsets[r]:offsets[r+1]``."""

    query_ids: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n + 1,) int64
    ids: np.ndarray  # (m,) int64 candidate ids
    similarities: np.ndarray  # (m,) float32 global similarity
    inliers: np.ndarray  # (m,) int32; NOT_VERIFIED where mining did not verify the pair

    def save(self, path) -> None:
        np.savez(path, **asdict(self))

    @classmethod
    def load(cls, path) -> "MinedRows":
        with np.load(path, allow_pickle=False) as z:
            rows = cls(**{k: z[k] for k in ("query_ids", "offsets", "ids", "similarities", "inliers")})
        if len(rows.offsets) != len(rows.query_ids) + 1 or rows.offsets[-1] != len(rows.ids) or \
                not len(rows.ids) == len(rows.similarities) == len(rows.inliers):
            raise ValueError("inconsistent arrays")
        return rows

    @classmethod
    def concat(cls, parts: list["MinedRows"]) -> "MinedRows":
        if not parts:
            z = np.zeros(0, np.int64)
            return cls(z, np.zeros(1, np.int64), z, np.zeros(0, np.float32), np.zeros(0, np.int32))
        sizes = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(np.concatenate([p.query_ids for p in parts]), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   np.concatenate([p.ids for p in parts]), np.concatenate([p.similarities for p in parts]),
                   np.concatenate([p.inliers for p in parts]))

    def anchors(self) -> np.ndarray:
        """(m,) the mined photo each candidate row belongs to."""
        return np.repeat(self.query_ids, np.diff(self.offsets))


def mine_photos(index, query_ids, cfg: MiningConfig, *, keys=None, workers: int = 2, progress=False) -> MinedRows:
    """Search and verify each of ``query_ids`` against the rest of ``index`` (see the module
    docstring); ``cfg`` as :func:`resolve` filled it in. ``progress``: a bar's label, or False."""
    from delg_geo.core.progress import progress_bar
    from delg_geo.core.runtime import single_threaded_blas
    from delg_geo.retrieval.calibrate import near_duplicates, photo_keys, query_settings
    from delg_geo.retrieval.search import shortlist
    from delg_geo.retrieval.verify import verify_pair

    vc = query_settings(index)[0]
    keys = keys if keys is not None else photo_keys(index.metadata)
    n = len(index)
    k = min(cfg.top_k, n - 1)
    k_local = min(int(cfg.local_top_k), n - 1) if index.asmk is not None else 0
    qids = np.asarray(query_ids, np.int64)
    out_ids, out_sims, out_inl, sizes = [], [], [], []
    bar = progress_bar(len(qids), progress if isinstance(progress, str) else "mine", bool(progress), unit="photo")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, single_threaded_blas():
        for qi in qids:
            qi = int(qi)
            drop = near_duplicates(qi, index.lats, index.lons, keys, cfg.leave_out)
            q_kp, q_desc = index.local_features(qi)
            q_kp, q_desc = q_kp[: vc.max_features], q_desc[: vc.max_features]
            cand = shortlist(index, index.global_rows(np.array([qi])), q_desc, k, k_local, exclude=drop)
            ids, sims = cand.ids, cand.similarities
            d_km = haversine_km(index.lats[qi], index.lons[qi], index.lats[ids], index.lons[ids])
            check = d_km <= cfg.radius_km
            far = np.flatnonzero(d_km >= cfg.negative_km)
            check[far[np.argsort(-sims[far], kind="stable")[: cfg.verify_far]]] = True
            q_size = index.image_size(qi)

            def one(j: int) -> int:
                kp, desc = index.local_features(j)
                if index.candidate_problem(j, kp, desc):
                    return NOT_VERIFIED  # damaged stored features: no evidence either way
                return verify_pair(q_kp, q_desc, kp, desc, vc, q_size, index.image_size(j), seed=SEED).inliers

            inl = np.full(len(ids), NOT_VERIFIED, np.int32)
            todo = np.flatnonzero(check)
            inl[todo] = list(pool.map(one, [int(j) for j in ids[todo]]))
            out_ids.append(ids)
            out_sims.append(sims.astype(np.float32))
            out_inl.append(inl)
            sizes.append(len(ids))
            bar.update(1)
    bar.close()
    if not sizes:
        return MinedRows.concat([])
    return MinedRows(qids, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), np.concatenate(out_ids).astype(np.int64),
                     np.concatenate(out_sims), np.concatenate(out_inl))


@dataclass
class MinedSet:
    """What training uses: positive pairs, hard negatives and places, over the index's ids."""

    positives: np.ndarray  # (P, 2) int64, i < j, unique
    positive_inliers: np.ndarray  # (P,) int32
    negatives: np.ndarray  # (Q, 2) int64 (anchor, negative)
    negative_similarities: np.ndarray  # (Q,) float32
    far_verified: np.ndarray  # (F, 2) int64: far apart, yet they verify (never a negative)
    places: np.ndarray  # (N,) int64 place label, -1 for a photo in no place
    mined_photos: int

    @property
    def num_places(self) -> int:
        return int(self.places.max(initial=-1) + 1)

    def counts(self) -> dict:
        in_place = int((self.places >= 0).sum())
        return dict(mined_photos=int(self.mined_photos), positive_pairs=int(len(self.positives)),
                    places=self.num_places, photos_in_places=in_place, hard_negatives=int(len(self.negatives)),
                    far_verified_pairs=int(len(self.far_verified)))


def _unique_pairs(a: np.ndarray, b: np.ndarray, value: np.ndarray, reduce=np.maximum) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs (min, max) once each, with ``reduce`` of their values."""
    if len(a) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, value.dtype)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.stack([lo, hi], 1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    out = np.full(len(uniq), np.iinfo(np.int64).min if reduce is np.maximum else np.iinfo(np.int64).max, np.int64)
    reduce.at(out, inv, value.astype(np.int64))
    return uniq.astype(np.int64), out.astype(value.dtype)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) connected-component label of each node, -1 for a node in no pair; labels numbered
    from 0 in the order of each component's smallest node."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    member = np.zeros(n, bool)
    member[pairs.reshape(-1)] = True
    labels = np.full(n, -1, np.int64)
    order = {}
    for i in np.flatnonzero(member):
        labels[i] = order.setdefault(int(roots[i]), len(order))
    return labels


def mined_set(rows: MinedRows, lats, lons, cfg: MiningConfig, max_negatives: int = 10) -> MinedSet:
    """Positives, hard negatives and places from mined ``rows`` (``cfg`` resolved)."""
    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    a, b = rows.anchors(), rows.ids
    d_km = haversine_km(lats[a], lons[a], lats[b], lons[b]) if len(a) else np.zeros(0)
    verified = rows.inliers >= cfg.min_inliers
    pos = verified & (d_km <= cfg.radius_km)
    positives, pos_inl = _unique_pairs(a[pos], b[pos], rows.inliers[pos])
    far_v = (rows.inliers >= cfg.negative_inliers) & (d_km >= cfg.negative_km)
    far_verified, _ = _unique_pairs(a[far_v], b[far_v], rows.inliers[far_v])
    neg = (rows.inliers >= 0) & (rows.inliers < cfg.negative_inliers) & (d_km >= cfg.negative_km)
    if len(far_verified) and neg.any():  # a pair that verifies from either side is never a negative
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        fv = set(map(tuple, far_verified.tolist()))
        neg &= np.array([(int(x), int(y)) not in fv for x, y in zip(lo, hi)], bool)
    na, nb, ns = a[neg], b[neg], rows.similarities[neg]
    keep = []
    for q in np.unique(na):  # each anchor's most similar ones
        idx = np.flatnonzero(na == q)
        keep.append(idx[np.argsort(-ns[idx], kind="stable")[:max_negatives]])
    keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    places = components(len(lats), positives)
    return MinedSet(positives, pos_inl, np.stack([na[keep], nb[keep]], 1).astype(np.int64) if len(keep) else
                    np.zeros((0, 2), np.int64), ns[keep].astype(np.float32), far_verified, places, len(rows.query_ids))


def require_places(found: MinedSet, needed: int = MIN_PLACES, where: str = "the index") -> None:
    """Refuse, in one line, a collection too small or too sparse to learn from."""
    if found.num_places < needed:
        c = found.counts()
        raise DelgGeoError(
            f"{where}: too few places to adapt to: mining found {c['places']} place(s) (groups of photos within "
            f"the confidence radius that verify each other; {c['positive_pairs']} verified pair(s) among "
            f"{c['mined_photos']} photos mined), and at least {needed} are needed; add photos taken near each other, "
            "or lower --min-places")

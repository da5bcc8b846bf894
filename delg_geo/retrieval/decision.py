"""Stage 5a — decide: one query's answer from its verified candidates, and the evidence for it.

Pure functions of the candidates' coordinates, global similarities and inlier counts, shared by
``Geolocator.decide`` (queries) and :mod:`delg_geo.retrieval.calibrate` (the collection's own photos), so
the confidence is fitted on exactly what a query computes.

* :func:`vote_verified`: verified neighbours vote (see :mod:`delg_geo.retrieval.locate`).
* :func:`decide_candidates`: the vote when some candidate reaches ``min_inliers``, else the
  kernel-density vote over the global top-k ([L]kNN) or the global top-1.
* :func:`evidence_at`: what speaks for a position being right, as numbers (``EVIDENCE``):
  whether it is verified, the most inliers of a candidate near it, the summed inliers (above the
  chance level) near it, the most inliers of a candidate far from it (a rival place), the
  similarity-weighted share of the candidates near it, and the best similarity near it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from delg_geo.core.geo import haversine_km

#: Evidence names, in the order of :func:`evidence_at`'s vector, and the sign each one's weight
#: must have in the fitted confidence (+1: more of it never lowers the confidence).
EVIDENCE = ("verified", "log_inliers", "log_support", "log_rival_inliers", "agreement", "similarity")
EVIDENCE_SIGNS = (1, 1, 1, -1, 1, 1)


@dataclass(frozen=True)
class DecisionRule:
    """The vote's settings: a candidate with ``min_inliers`` verifies; inliers up to
    ``base_inliers`` count as chance; candidates within ``vote_radius_km`` support each other."""

    min_inliers: int = 15
    base_inliers: int = 10
    vote_radius_km: float = 0.06

    def to_dict(self) -> dict:
        return asdict(self)

    def as_tuple(self) -> tuple[int, int, float]:
        return (self.min_inliers, self.base_inliers, self.vote_radius_km)


@dataclass
class Decision:
    best: int  # index of the answering candidate (for the kNN vote: the candidate nearest its position)
    order: np.ndarray  # candidate indices, best first
    lat: float
    lon: float
    verified: bool
    knn_score: float  # share of the kNN vote behind the answer; NaN unless the kNN fallback answered


def vote_verified(
    lats: np.ndarray,
    lons: np.ndarray,
    sims: np.ndarray,
    inliers: np.ndarray,
    min_inliers: int,
    base_inliers: int,
    radius_km: float,
) -> tuple[int, np.ndarray]:
    """The verified-neighbour vote over one query's candidates.

    Returns ``(best, order)``: the index of the answering candidate, and all candidate indices
    best-first. Each candidate's support is the sum, over candidates within ``radius_km`` of it,
    of ``max(inliers - base_inliers, 0)``; only places where some candidate reaches
    ``min_inliers`` can win, and the answer is the best-verified photo of the winning place.
    The caller checks that at least one candidate reaches ``min_inliers``.
    """
    sims = np.asarray(sims, np.float64)
    inliers = np.asarray(inliers)
    w = np.maximum(inliers - base_inliers, 0).astype(np.float64)
    near = haversine_km(lats[:, None], lons[:, None], lats[None, :], lons[None, :]) <= radius_km
    support = near.astype(np.float64) @ w
    # only places that at least one candidate verifies on its own can win
    support = np.where(near[:, inliers >= min_inliers].any(axis=1), support, -1.0)
    ranking = np.lexsort((-sims, -inliers, -support))
    members = np.flatnonzero(near[int(ranking[0])])
    best = int(members[np.lexsort((-sims[members], -inliers[members]))[0]])
    order = np.concatenate([[best], ranking])
    order = order[np.sort(np.unique(order, return_index=True)[1])]
    return best, order


def decide_candidates(
    lats, lons, sims, inliers, rule: DecisionRule, *, verify: bool = True, fallback: str = "knn",
    knn_sigma_km: float = 0.1, knn_fine_km: float | None = None,
) -> Decision:
    """The answer among one query's candidates (arrays of equal length, at least one)."""
    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    sims = np.asarray(sims, np.float64)
    inliers = np.asarray(inliers)
    if verify and inliers.max(initial=0) >= rule.min_inliers:
        best, order = vote_verified(lats, lons, sims, inliers, rule.min_inliers, rule.base_inliers, rule.vote_radius_km)
        return Decision(best, order, float(lats[best]), float(lons[best]), True, float("nan"))
    order = np.argsort(-sims, kind="stable")
    if verify and fallback == "knn" and len(sims) > 1:
        from delg_geo.retrieval.knn import knn_vote

        lat, lon, score = knn_vote(lats, lons, sims, knn_sigma_km, fine_sigma_km=knn_fine_km)
        best = int(np.argmin(haversine_km(lats, lons, lat, lon)))  # the candidate nearest the voted position
        order = np.concatenate([[best], order[order != best]])
        return Decision(best, order, float(lat), float(lon), False, float(score))
    best = int(order[0])
    return Decision(best, order, float(lats[best]), float(lons[best]), False, float("nan"))


def evidence_at(lat, lon, lats, lons, sims, inliers, rule: DecisionRule, radius_km: float, verified: bool) -> np.ndarray:
    """The evidence (``EVIDENCE``) that the position ``(lat, lon)`` is within ``radius_km`` of the
    truth, from one query's candidates."""
    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    sims = np.asarray(sims, np.float64)
    inliers = np.asarray(inliers, np.float64)
    d = haversine_km(lats, lons, float(lat), float(lon))
    near = d <= radius_km
    w = np.maximum(sims, 0.0)
    return np.array([
        1.0 if verified else 0.0,
        np.log1p(inliers[near].max(initial=0.0)),
        np.log1p(np.maximum(inliers[near] - rule.base_inliers, 0.0).sum()),
        np.log1p(inliers[~near].max(initial=0.0)),
        float(w[near].sum() / w.sum()) if w.sum() > 0 else 0.0,
        float(sims[near].max(initial=0.0)),
    ])

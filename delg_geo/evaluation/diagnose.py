"""Evaluate, part two: why a benchmark's verified answers miss.

Reads what ``delg-geo bench`` leaves in its output folder (``candidates.npz`` and
``predictions.csv``) with the index's coordinates, and answers three questions:

* **Retrieval recall:** how often is a candidate within ``radius_km`` of the truth among the
  global top-k, for several k? That bounds what re-ranking can reach.
* **Breakdown of misses:** for each query, is the right place absent from the candidates, present
  but with too few inliers to verify, or present and verified but out-voted by a wrong place?
* **Honest decision-rule accuracy:** the vote's three settings (``min_inliers``,
  ``vote_base_inliers``, ``vote_radius_km``) are picked on one half of the queries and scored on
  the other, repeatedly, so a number tuned on the same queries it reports is not mistaken for
  what a new query set would see.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.geo import haversine_km
from delg_geo.retrieval.locate import vote_verified

#: The vote settings tried by :func:`cross_validate_rule`: (min_inliers, base_inliers, radius_km).
DEFAULT_GRID: tuple[tuple[int, int, float], ...] = tuple(
    itertools.product((10, 12, 15, 20, 25), (0, 6, 8, 10, 12), (0.03, 0.06, 0.1, 0.15))
)


@dataclass
class BenchCandidates:
    """One benchmark's verified candidates: (N, K) arrays aligned with ``img_id``."""

    img_id: np.ndarray  # (N,) str
    ids: np.ndarray  # (N, K) int64 index ids, -1 = padding
    similarities: np.ndarray  # (N, K) float32
    inliers: np.ndarray  # (N, K) int32

    @classmethod
    def load(cls, path: str | Path) -> "BenchCandidates":
        path = Path(path)
        if not path.is_file():
            raise DelgGeoError(f"{path}: not found; run `delg-geo bench` with the verified method first")
        try:
            with np.load(path, allow_pickle=False) as z:
                c = cls(z["img_id"].astype(str), z["ids"], z["similarities"], z["inliers"])
        except (OSError, KeyError, ValueError) as e:
            raise DelgGeoError(f"{path}: not a candidates file ({e})") from None
        n, k = c.ids.shape
        if c.img_id.shape != (n,) or c.similarities.shape != (n, k) or c.inliers.shape != (n, k):
            raise DelgGeoError(f"{path}: arrays of mismatched shapes")
        return c


@dataclass
class Breakdown:
    """Queries by why the verified answer could or could not be right (counts)."""

    n_queries: int
    no_correct_candidate: int  # nothing within the radius among the candidates
    correct_but_weak: int  # a right candidate exists, none reaches min_inliers
    wrong_outverifies: int  # a right candidate verifies, a wrong one has more inliers
    correct_verifies_best: int  # the candidate with most inliers is right and verified

    def fractions(self) -> dict[str, float]:
        d = asdict(self)
        n = max(1, d.pop("n_queries"))
        return {k: v / n for k, v in d.items()}


@dataclass
class CrossValidation:
    folds: int
    repeats: int
    mean_accuracy: float  # fraction within radius_km, on held-out halves
    min_accuracy: float
    max_accuracy: float
    mean_median_km: float
    in_sample_best: tuple[int, int, float]  # settings that are best on all queries
    in_sample_accuracy: float
    default_accuracy: float  # the settings passed as ``default``
    grid_size: int
    picked: list[tuple[int, int, float]] = field(default_factory=list)  # per held-out fold


def correct_mask(cand_lats, cand_lons, gt_lat, gt_lon, valid, radius_km: float) -> np.ndarray:
    """(N, K) bool: candidate within ``radius_km`` of its query's true position."""
    d = haversine_km(np.asarray(gt_lat)[:, None], np.asarray(gt_lon)[:, None], cand_lats, cand_lons)
    return (d <= radius_km) & valid


def recall_at_k(correct: np.ndarray, ks=(1, 5, 10, 20, 50, 100)) -> dict[int, float]:
    """Fraction of queries with a right candidate among the first k, for each k up to the number
    of candidates, and for that number itself."""
    correct = np.asarray(correct, bool)
    kmax = correct.shape[1]
    ks = sorted({int(k) for k in ks if k <= kmax} | {kmax})
    return {k: float(correct[:, :k].any(axis=1).mean()) for k in ks}


def breakdown(inliers: np.ndarray, correct: np.ndarray, min_inliers: int) -> Breakdown:
    inliers = np.asarray(inliers)
    counts = dict(no_correct_candidate=0, correct_but_weak=0, wrong_outverifies=0, correct_verifies_best=0)
    for inl, ok in zip(inliers, np.asarray(correct, bool)):
        if not ok.any():
            counts["no_correct_candidate"] += 1
            continue
        best_right = inl[ok].max()
        best_wrong = inl[~ok].max(initial=0)
        if best_right < min_inliers:
            counts["correct_but_weak"] += 1
        elif best_wrong > best_right:
            counts["wrong_outverifies"] += 1
        else:
            counts["correct_verifies_best"] += 1
    return Breakdown(n_queries=len(inliers), **counts)


def rule_errors_km(
    cand_lats, cand_lons, sims, inliers, valid, gt_lat, gt_lon, fallback_lat, fallback_lon,
    settings: tuple[int, int, float],
) -> np.ndarray:
    """Each query's error (km) when the vote uses ``settings``; ``fallback_*`` when nothing verifies."""
    min_inl, base, radius = settings
    out = np.empty(len(inliers))
    for i in range(len(inliers)):
        v = valid[i]
        inl = np.asarray(inliers[i])[v]
        if len(inl) and inl.max() >= min_inl:
            best, _ = vote_verified(cand_lats[i][v], cand_lons[i][v], sims[i][v], inl, min_inl, base, radius)
            lat, lon = cand_lats[i][v][best], cand_lons[i][v][best]
        else:
            lat, lon = fallback_lat[i], fallback_lon[i]
        out[i] = haversine_km(gt_lat[i], gt_lon[i], lat, lon)
    return out


def cross_validate_rule(
    cand_lats, cand_lons, sims, inliers, valid, gt_lat, gt_lon, fallback_lat, fallback_lon,
    radius_km: float = 0.1,
    grid=DEFAULT_GRID,
    default: tuple[int, int, float] = (15, 10, 0.06),
    folds: int = 2,
    repeats: int = 10,
    seed: int = 0,
) -> CrossValidation:
    """Pick the vote settings on all folds but one, score on the held-out fold; repeat."""
    n = len(inliers)
    if n < folds:
        raise DelgGeoError(f"cross-validation needs at least {folds} queries, got {n}")
    grid = [tuple(g) for g in grid]
    if tuple(default) not in grid:
        grid.append(tuple(default))
    errs = {g: rule_errors_km(cand_lats, cand_lons, sims, inliers, valid, gt_lat, gt_lon,
                              fallback_lat, fallback_lon, g) for g in grid}
    hits = {g: e <= radius_km for g, e in errs.items()}
    rng = np.random.default_rng(seed)
    accs, meds, picked = [], [], []
    for _ in range(repeats):
        parts = np.array_split(rng.permutation(n), folds)
        held = np.empty(n)
        for f in range(folds):
            test = parts[f]
            train = np.concatenate([parts[j] for j in range(folds) if j != f])
            g = max(grid, key=lambda s: (hits[s][train].mean(), s == tuple(default)))
            picked.append(g)
            held[test] = errs[g][test]
        accs.append(float((held <= radius_km).mean()))
        meds.append(float(np.median(held)))
    best = max(grid, key=lambda s: (hits[s].mean(), s == tuple(default)))
    return CrossValidation(
        folds=folds, repeats=repeats, mean_accuracy=float(np.mean(accs)), min_accuracy=float(min(accs)),
        max_accuracy=float(max(accs)), mean_median_km=float(np.mean(meds)), in_sample_best=best,
        in_sample_accuracy=float(hits[best].mean()), default_accuracy=float(hits[tuple(default)].mean()),
        grid_size=len(grid), picked=picked,
    )

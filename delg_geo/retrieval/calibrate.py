"""Stage 7 — calibrate: a ``confidence`` that is the probability of being within a radius.

Fitted on the collection itself, never on a query set:

1. **Self-queries.** A random sample of the index's own photos is located against the rest,
   from their stored global and local features (nothing is re-extracted; the compact store's
   decoded local descriptors stand in for a query's projected ones). Each photo's
   near-duplicates are left out first (:func:`near_duplicates`): the same photographer's burst
   looks like a query of the same place that no real query would ever be.
   Photos whose exact position other photos share (a saved pin, not a GPS fix:
   :func:`pinned_geotags`) are not sampled, since their position is no truth to score against.
2. **The decision rule** (min inliers, chance inliers, vote radius) is picked on these
   self-queries, as the setting that puts most answers within the confidence radius; the
   default stays unless the best beats it by more than a standard error.
3. **The confidence.** For every self-query answer under that rule, the evidence
   (:data:`delg_geo.retrieval.decision.EVIDENCE`) and whether the answer is within the radius of the
   photo's own position. A sign-constrained logistic regression of "within" on the evidence,
   then an isotonic regression of "within" on its output, make a map that is monotone in every
   piece of evidence; its out-of-fold calibration error on the collection is recorded too.

The result is ``calibration.json`` in the index (listed in the manifest): the radius, the rule,
the leave-out rule, the two maps' numbers and the collection's cross-validated scores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from delg_geo.retrieval.decision import EVIDENCE, DecisionRule, decide_candidates, evidence_at
from delg_geo.core.errors import DelgGeoError
from delg_geo.core.geo import haversine_km
from delg_geo.retrieval.knn import fine_scale
from delg_geo.retrieval.confidence import (  # noqa: F401 (the calibration file and its map, public here too)
    CALIBRATION_FILE, CALIBRATION_VERSION, DEFAULT_RADIUS_KM, Calibration, ConfidenceMap, LeaveOut,
    confidence_sentence, cross_validated_confidence, fit_confidence, format_radius, load_index_calibration,
    set_confidence_radius, write_calibration,
)

DEFAULT_SAMPLE = 1000  # self-queries: smaller samples leave the fitted map noisier from draw to draw
#: Collections smaller than this are not calibrated at build time (too few self-queries).
MIN_IMAGES = 200

#: The decision-rule settings tried: (min_inliers, base_inliers, vote_radius_km).
RULE_GRID: tuple[tuple[int, int, float], ...] = tuple(
    (m, b, r) for m in (10, 12, 15, 20, 25, 30) for b in (0, 6, 8, 10, 12, 15) for r in (0.03, 0.06, 0.1, 0.15) if b < m
)

ID_COLUMNS = ("flickr_photo_id", "photo_id", "flickr_id", "photoid")
TIME_COLUMNS = ("datetaken", "date_taken", "capture_time", "datetime", "timestamp", "taken")
OWNER_COLUMNS = ("owner", "user_nsid", "user_id", "photographer", "author", "userid")


@dataclass
class PhotoKeys:
    """What the collection says about each photo's origin (None where it has no such column)."""

    ids: np.ndarray | None = None  # int64 photo ids
    times: np.ndarray | None = None  # float64 seconds, NaN when unknown
    owners: np.ndarray | None = None  # str
    columns: dict = field(default_factory=dict)  # which metadata columns were used


def photo_keys(metadata) -> PhotoKeys:
    """Photo ids, capture times and owners from an index's metadata table, where present."""
    import pandas as pd

    cols = {c.lower(): c for c in metadata.columns}
    keys = PhotoKeys()
    for name in ID_COLUMNS:
        if name in cols:
            v = pd.to_numeric(metadata[cols[name]], errors="coerce")
            if v.notna().mean() > 0.9:
                keys.ids = v.fillna(-1).to_numpy(np.int64)
                keys.columns["id"] = cols[name]
                break
    for name in TIME_COLUMNS:
        if name in cols:
            t = pd.to_datetime(metadata[cols[name]], errors="coerce", utc=True)
            if t.notna().mean() > 0.5:
                keys.times = (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)
                keys.columns["time"] = cols[name]
                break
    for name in OWNER_COLUMNS:
        if name in cols:
            keys.owners = metadata[cols[name]].astype(str).to_numpy()
            keys.columns["owner"] = cols[name]
            break
    return keys


def near_duplicates(i: int, lats, lons, keys: PhotoKeys, rule: LeaveOut = LeaveOut()) -> np.ndarray:
    """Indices of photo ``i``'s near-duplicates, ``i`` itself included (see :class:`LeaveOut`)."""
    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    d_m = haversine_km(lats[i], lons[i], lats, lons) * 1000.0
    out = d_m <= rule.identical_m
    close = d_m <= rule.burst_m
    adjacent = np.zeros(len(lats), bool)
    if keys.ids is not None and keys.ids[i] >= 0:
        adjacent |= (np.abs(keys.ids - keys.ids[i]) <= rule.max_id_gap) & (keys.ids >= 0)
    if keys.times is not None and np.isfinite(keys.times[i]):
        adjacent |= np.abs(keys.times - keys.times[i]) <= rule.max_time_gap_s
    if keys.owners is not None and keys.owners[i] not in ("", "nan"):
        adjacent |= keys.owners == keys.owners[i]
    out |= close & adjacent
    out[i] = True
    return np.flatnonzero(out)


# -- self-queries ----------------------------------------------------------------------------

@dataclass
class SelfQueries:
    """The sampled photos' candidates among the rest of the collection: (n, k) arrays."""

    query_ids: np.ndarray  # (n,) int64 index ids of the sampled photos
    ids: np.ndarray  # (n, k) int64 candidate ids, -1 = padding
    similarities: np.ndarray  # (n, k) float32
    inliers: np.ndarray  # (n, k) int32
    left_out: np.ndarray  # (n,) int32: near-duplicates left out per query (itself excluded)

    def save(self, path) -> None:
        np.savez(path, **{k: v for k, v in asdict(self).items()})

    @classmethod
    def load(cls, path) -> "SelfQueries":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in ("query_ids", "ids", "similarities", "inliers", "left_out")})


def pinned_geotags(lats, lons, keys: PhotoKeys, rule: LeaveOut = LeaveOut()) -> np.ndarray:
    """(N,) bool: photos whose exact position another photo of another burst shares.

    Such a position is a photographer's saved pin, reused for photos taken elsewhere, not a GPS
    fix of this photo, so it cannot serve as a self-query's truth (such self-queries are right far
    less often, even with many inliers: docs/confidence.md). They stay in the index as references.
    Without ids, times or owners, any shared position counts as pinned.
    """
    import pandas as pd

    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    out = np.zeros(len(lats), bool)
    groups = pd.DataFrame(dict(lat=lats, lon=lons)).groupby(["lat", "lon"]).indices
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            others = members[members != i]
            same_burst = np.zeros(len(others), bool)
            if keys.ids is not None:
                same_burst |= np.abs(keys.ids[others] - keys.ids[i]) <= rule.max_id_gap
            if keys.times is not None:
                same_burst |= np.abs(keys.times[others] - keys.times[i]) <= rule.max_time_gap_s
            out[i] = not same_burst.all()
    return out


def sample_ids(n: int, sample: int, seed: int = 0, eligible: np.ndarray | None = None) -> np.ndarray:
    """``sample`` ids drawn at random (without replacement) from the eligible ones."""
    pool = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(int(sample), len(pool)), replace=False)).astype(np.int64)


def collect_self_queries(
    index, sample: int = DEFAULT_SAMPLE, *, top_k: int = 100, local_top_k: int | None = None, verify_config=None,
    leave_out: LeaveOut = LeaveOut(), seed: int = 0, workers: int = 2, progress: bool = False, query_ids=None,
) -> SelfQueries:
    """Locate a sample of ``index``'s photos against the rest (near-duplicates left out), from the
    stored features, with the candidates a query gets (:func:`delg_geo.retrieval.search.shortlist`: the
    global top-``top_k`` and the ASMK top-``local_top_k``, by default as many). ``index`` is an open
    :class:`delg_geo.index.geo_index.GeoIndex`."""
    from delg_geo.retrieval.verify import VerifyConfig, verify_pair

    vc = verify_config or VerifyConfig()
    n = len(index)
    if n < 3:
        raise DelgGeoError(f"{index.path}: {n} images are too few to calibrate on")
    keys = photo_keys(index.metadata)
    if query_ids is None:
        eligible = ~pinned_geotags(index.lats, index.lons, keys, leave_out)
        if eligible.sum() < 3:
            raise DelgGeoError(f"{index.path}: fewer than 3 photos have a position of their own (not a shared pin)")
        qids = sample_ids(n, sample, seed, eligible)
    else:
        qids = np.asarray(query_ids, np.int64)
    k = min(top_k, n - 1)
    k_local = int(top_k if local_top_k is None else local_top_k) if getattr(index, "asmk", None) is not None else 0
    width = k + min(k_local, n - 1)
    ids = np.full((len(qids), width), -1, np.int64)
    sims = np.full((len(qids), width), np.nan, np.float32)
    inl = np.zeros((len(qids), width), np.int32)
    left = np.zeros(len(qids), np.int32)
    from delg_geo.core.runtime import single_threaded_blas
    from delg_geo.retrieval.search import shortlist

    bar = _bar(len(qids), "calibrate", progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, single_threaded_blas():
        for row, qi in enumerate(qids):
            drop = near_duplicates(int(qi), index.lats, index.lons, keys, leave_out)
            left[row] = len(drop) - 1
            q_kp, q_desc = index.local_features(int(qi))
            q_kp, q_desc = q_kp[: vc.max_features], q_desc[: vc.max_features]
            cand = shortlist(index, index.global_rows(np.array([qi])), q_desc, k, k_local, exclude=drop)
            c_ids, c_sims = cand.ids, cand.similarities
            q_size = index.image_size(int(qi))

            def one(j: int) -> int:
                kp, desc = index.local_features(int(j))
                return verify_pair(q_kp, q_desc, kp, desc, vc, q_size, index.image_size(int(j))).inliers

            m = len(c_ids)
            ids[row, :m], sims[row, :m] = c_ids, c_sims
            inl[row, :m] = list(pool.map(one, c_ids))
            bar.update(1)
    bar.close()
    return SelfQueries(qids, ids, sims, inl, left)


# -- answers and evidence --------------------------------------------------------------------

def answers(lats, lons, sq: SelfQueries, rule: DecisionRule, knn_sigma_km: float, radius_km: float,
            verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Each self-query's answer under ``rule``: (error_km (n,), evidence (n, F))."""
    err = np.empty(len(sq.query_ids))
    ev = np.empty((len(sq.query_ids), len(EVIDENCE)))
    fine_km = fine_scale(knn_sigma_km, radius_km)  # the two scales Geolocator votes at
    for r, qi in enumerate(sq.query_ids):
        v = sq.ids[r] >= 0
        c = sq.ids[r][v]
        la, lo, si, il = lats[c], lons[c], sq.similarities[r][v], sq.inliers[r][v]
        d = decide_candidates(la, lo, si, il, rule, verify=verify, knn_sigma_km=knn_sigma_km, knn_fine_km=fine_km)
        err[r] = haversine_km(lats[qi], lons[qi], d.lat, d.lon)
        ev[r] = evidence_at(d.lat, d.lon, la, lo, si, il, rule, radius_km, d.verified)
    return err, ev


def tune_rule(lats, lons, sq: SelfQueries, knn_sigma_km: float, radius_km: float, grid=RULE_GRID,
              default: DecisionRule = DecisionRule(), min_gain_se: float = 1.0) -> tuple[DecisionRule, dict]:
    """The rule that puts most self-query answers within ``radius_km``.

    The default stays unless the best setting beats it by more than ``min_gain_se`` standard
    errors of the paired difference (per self-query, right under one minus right under the
    other): among 120 settings the best one is ahead by chance alone. Returns the rule and each
    tried setting's accuracy.
    """
    grid = [tuple(g) for g in grid]
    d0 = default.as_tuple()
    if d0 not in grid:
        grid.append(d0)
    hits = {}
    for g in grid:
        err, _ = answers(lats, lons, sq, DecisionRule(*g), knn_sigma_km, radius_km)
        hits[g] = (err <= radius_km).astype(np.float64)
    best = max(grid, key=lambda g: (hits[g].mean(), g == d0))
    diff = hits[best] - hits[d0]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    if diff.mean() <= min_gain_se * se:
        best = d0
    return DecisionRule(*best), {f"{g[0]},{g[1]},{g[2]:g}": float(h.mean()) for g, h in hits.items()}


def fit_calibration(lats, lons, sq: SelfQueries, *, radius_km: float = DEFAULT_RADIUS_KM, knn_sigma_km: float = 0.1,
                    leave_out: LeaveOut = LeaveOut(), tune: bool = True, default_rule: DecisionRule = DecisionRule(),
                    grid=RULE_GRID) -> Calibration:
    """The decision rule and the confidence map from a set of self-queries."""
    from delg_geo.retrieval.reliability import expected_calibration_error, precision_coverage

    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    if tune:
        rule, grid_acc = tune_rule(lats, lons, sq, knn_sigma_km, radius_km, grid, default_rule)
    else:
        rule, grid_acc = default_rule, {}
    err, ev = answers(lats, lons, sq, rule, knn_sigma_km, radius_km)
    right = err <= radius_km
    if right.all() or not right.any():
        raise DelgGeoError(
            f"all {len(right)} self-queries were {'right' if right.all() else 'wrong'} within "
            f"{radius_km * 1000:.0f} m: nothing to calibrate against; try another --confidence-radius-km")
    cmap = fit_confidence(ev, right)
    oof = cross_validated_confidence(ev, right)
    p50, c50 = precision_coverage(oof, right, 0.5)
    p80, c80 = precision_coverage(oof, right, 0.8)
    stats = dict(
        sample=int(len(right)), candidates=int(sq.ids.shape[1]),
        near_duplicates_left_out_mean=float(np.mean(sq.left_out)),
        accuracy=float(right.mean()), verified_fraction=float(ev[:, 0].mean()),
        default_rule_accuracy=grid_acc.get("{},{},{:g}".format(*default_rule.as_tuple())),
        cv_ece=expected_calibration_error(oof, right), cv_mean_confidence=float(oof.mean()), cv_precision_at_0_5=p50, cv_coverage_at_0_5=c50,
        cv_precision_at_0_8=p80, cv_coverage_at_0_8=c80,
    )
    return Calibration(radius_km=float(radius_km), rule=rule, confidence_map=cmap, leave_out=leave_out, stats=stats)


def _bar(n, desc, enabled):
    from delg_geo.core.progress import progress_bar

    return progress_bar(n, desc, enabled)


# -- an index's calibration ------------------------------------------------------------------

def calibrate_index(
    index_dir, *, sample: int = DEFAULT_SAMPLE, radius_km: float | None = None, top_k: int = 100, local_top_k: int | None = None,
    leave_out: LeaveOut = LeaveOut(), tune: bool = True, seed: int = 0, workers: int = 2, progress: bool = False,
    self_queries: SelfQueries | None = None, log=None,
) -> Calibration:
    """Fit the index's calibration on its own photos and store it (``calibration.json``, listed
    in the manifest). ``radius_km`` defaults to the manifest's ``confidence_radius_km``. Holds the
    index's writer lock (:mod:`delg_geo.index.lock`) throughout."""
    from delg_geo.index.lock import storage_errors, writer_lock

    with storage_errors(index_dir, resumable=False), writer_lock(index_dir, "delg-geo index calibrate"):
        return _calibrate(index_dir, sample, radius_km, top_k, local_top_k, leave_out, tune, seed, workers, progress,
                          self_queries, log)


def _calibrate(index_dir, sample, radius_km, top_k, local_top_k, leave_out, tune, seed, workers, progress, self_queries,
               log) -> Calibration:
    import time

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.knn import default_sigma_km

    t0 = time.perf_counter()
    index = GeoIndex(index_dir, device="cpu")
    m = index.manifest
    radius = float(radius_km if radius_km is not None else m.confidence_radius_km)
    if not radius > 0:
        raise DelgGeoError(f"the confidence radius must be positive, got {radius} km")
    vc, default_rule = query_settings(index)
    if self_queries is None:
        self_queries = collect_self_queries(index, sample, top_k=top_k, local_top_k=local_top_k, verify_config=vc,
                                            leave_out=leave_out, seed=seed, workers=workers, progress=progress)
    sigma = default_sigma_km(index.lats, index.lons)
    cal = fit_calibration(index.lats, index.lons, self_queries, radius_km=radius, knn_sigma_km=sigma,
                          leave_out=leave_out, tune=tune, default_rule=default_rule)
    cal.stats.update(seed=int(seed), seconds=round(time.perf_counter() - t0, 1), fitted=_now())
    write_calibration(index.path, cal)
    if log:
        s = cal.stats
        log(f"calibrated on {s['sample']} of the index's own photos (near-duplicates left out): "
            f"{s['accuracy']:.1%} within {radius * 1000:.0f} m, rule {cal.rule.as_tuple()}, "
            f"cross-validated ECE {s['cv_ece']:.3f}")
    return cal


def query_settings(index):
    """The verification settings and the default decision rule a query of ``index`` uses: those
    of the index's local features (``index build --local``) where they differ by type."""
    from delg_geo.retrieval import locate
    from delg_geo.retrieval import verify

    local = getattr(index.manifest, "local_features", "delg")
    vc = getattr(verify, "VERIFY_DEFAULTS", {}).get(local) or verify.VerifyConfig()
    cfg = locate.LocateConfig()
    base = getattr(locate, "VOTE_BASE_DEFAULTS", {}).get(local, cfg.vote_base_inliers)
    return vc, DecisionRule(vc.min_inliers, int(base), cfg.vote_radius_km)


def _now() -> str:
    from delg_geo.index.geo_index import now_iso

    return now_iso()



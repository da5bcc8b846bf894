"""Diagnosis of a benchmark's misses: recall, breakdown, the vote, and its cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from delg_geo.evaluation.diagnose import BenchCandidates, breakdown, correct_mask, cross_validate_rule, recall_at_k
from delg_geo.core.errors import DelgGeoError
from delg_geo.retrieval.locate import vote_verified

M = 1 / 111.32  # degrees of latitude per km, near enough for these tests


def test_recall_at_k_counts_queries_not_candidates():
    ok = np.array([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    assert recall_at_k(ok, ks=(1, 2, 3, 10)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}


def test_correct_mask_respects_radius_and_padding():
    lats = np.array([[45.0, 45.0 + 0.05 * M, 45.0 + 0.2 * M]])
    lons = np.full((1, 3), 12.0)
    valid = np.array([[True, True, False]])
    ok = correct_mask(lats, lons, [45.0], [12.0], valid, 0.1)
    assert ok.tolist() == [[True, True, False]]


def test_breakdown_sorts_each_query_into_one_reason():
    inl = np.array([
        [40, 3, 2],   # right candidate verifies and has the most inliers
        [8, 30, 1],   # right (first) verifies? no: 8 < 15 -> weak
        [20, 35, 0],  # right verifies (20) but a wrong one has 35
        [50, 50, 9],  # no right candidate at all
    ])
    ok = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], bool)
    b = breakdown(inl, ok, min_inliers=15)
    assert (b.correct_verifies_best, b.correct_but_weak, b.wrong_outverifies, b.no_correct_candidate) == (1, 1, 1, 1)
    assert b.fractions()["wrong_outverifies"] == 0.25


def test_vote_prefers_a_place_several_photos_verify():
    # candidates 0 and 1 sit 20 m apart with 25 inliers each; candidate 2 is 1 km away with 30
    lats = np.array([45.0, 45.0 + 0.02 * M, 45.0 + 1.0 * M])
    lons = np.full(3, 12.0)
    sims = np.array([0.5, 0.4, 0.9])
    best, order = vote_verified(lats, lons, sims, np.array([25, 25, 30]), 15, 10, 0.06)
    assert best == 0 and sorted(order.tolist()) == [0, 1, 2]
    # a place where nobody reaches min_inliers cannot win, however many weak photos it has
    best, _ = vote_verified(lats, lons, sims, np.array([14, 14, 16]), 15, 10, 0.06)
    assert best == 2
    # with the support of weak photos discounted to nothing, the single best photo wins
    best, _ = vote_verified(lats, lons, sims, np.array([16, 16, 30]), 15, 15, 0.06)
    assert best == 2


def _synthetic(n=40, k=6, seed=1):
    """Right candidate (index 0) with 30 inliers for half the queries, 8 for the others."""
    rng = np.random.default_rng(seed)
    gt_lat = 45.43 + rng.uniform(-0.01, 0.01, n)
    gt_lon = np.full(n, 12.33)
    lats = gt_lat[:, None] + np.r_[0.0, np.linspace(1.0, 3.0, k - 1)][None, :] * M
    lons = np.full((n, k), 12.33)
    inl = rng.integers(0, 12, (n, k))
    inl[: n // 2, 0] = 30
    inl[n // 2:, 0] = 8
    sims = np.tile(np.linspace(0.9, 0.5, k), (n, 1))
    # the fallback misses by 500 m
    return lats, lons, sims, inl, np.ones((n, k), bool), gt_lat, gt_lon, gt_lat + 0.5 * M, gt_lon


def test_cross_validation_scores_held_out_queries():
    args = _synthetic()
    cv = cross_validate_rule(*args, radius_km=0.1, grid=[(15, 10, 0.06), (25, 10, 0.06), (40, 10, 0.06)],
                             default=(15, 10, 0.06), repeats=3)
    # half the queries verify their right candidate; the others fall back and miss
    assert cv.default_accuracy == pytest.approx(0.5)
    assert cv.in_sample_accuracy == pytest.approx(0.5)
    assert cv.mean_accuracy == pytest.approx(0.5) and cv.min_accuracy == pytest.approx(0.5)
    # a threshold above every count verifies nothing: it is never picked
    assert all(p[0] != 40 for p in cv.picked) and len(cv.picked) == 3 * 2
    assert cv.mean_median_km > 0.1


def test_bench_candidates_load_errors(tmp_path):
    with pytest.raises(DelgGeoError, match="not found"):
        BenchCandidates.load(tmp_path / "candidates.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, img_id=np.array(["a", "b"]), ids=np.zeros((2, 3), np.int64),
             similarities=np.zeros((2, 2), np.float32), inliers=np.zeros((2, 3), np.int32))
    with pytest.raises(DelgGeoError, match="mismatched"):
        BenchCandidates.load(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DelgGeoError, match="not a candidates file"):
        BenchCandidates.load(tmp_path / "junk.npz")

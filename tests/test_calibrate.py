"""Calibration on synthetic data with known answers: the monotone fits, the calibration error,
the near-duplicate leave-out, the decision's evidence and the confidence in words."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from delg_geo.retrieval.calibrate import (
    Calibration,
    LeaveOut,
    SelfQueries,
    confidence_sentence,
    cross_validated_confidence,
    fit_calibration,
    fit_confidence,
    near_duplicates,
    photo_keys,
)
from delg_geo.retrieval.decision import EVIDENCE, DecisionRule, decide_candidates, evidence_at
from delg_geo.retrieval.monotone import IsotonicMap, fit_isotonic, fit_logistic
from delg_geo.retrieval.reliability import calibration_bins, expected_calibration_error, precision_coverage, reliability_report


def test_isotonic_recovers_a_known_rate():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, x.size) < x  # P(right | x) = x
    iso = fit_isotonic(x, y, min_block=50)
    assert np.all(np.diff(iso.y) >= 0) and np.all(np.diff(iso.x) > 0)
    grid = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(iso(grid), grid, atol=0.05)
    assert iso(-1.0) == iso.y[0] and iso(2.0) == iso.y[-1]  # flat beyond the data


def test_isotonic_pools_violations_and_ties():
    # a decreasing pair is pooled to its mean; equal x values are one block
    iso = fit_isotonic([0, 1, 2, 2, 3], [0, 1, 0, 1, 1])
    np.testing.assert_allclose(iso.y, [0.0, 2 / 3, 1.0])  # x=1 (1) pooled with x=2 (0, 1)
    np.testing.assert_allclose(iso.x, [0.0, 5 / 3, 3.0])
    # min_block: no block of fewer than 3 samples survives
    iso = fit_isotonic(np.arange(10), [0, 0, 0, 1, 0, 1, 1, 1, 1, 1], min_block=3)
    assert len(iso.x) <= 3 and np.all(np.diff(iso.y) >= 0)
    with pytest.raises(ValueError):
        fit_isotonic([], [])
    assert IsotonicMap.from_dict(iso.to_dict())(4.0) == pytest.approx(float(iso(4.0)), abs=1e-6)


def test_logistic_recovers_weights_and_honours_signs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2))
    y = rng.uniform(size=len(x)) < 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 1])))
    lg = fit_logistic(x, y, signs=[1, -1], l2=1e-3)
    w = lg.weights / lg.scale  # back to the unstandardised features
    np.testing.assert_allclose(w, [2.0, -1.0], atol=0.12)
    assert lg.intercept - (lg.mean / lg.scale) @ lg.weights == pytest.approx(0.5, abs=0.1)
    # a sign that contradicts the data leaves that weight at zero, and the map stays monotone
    lg2 = fit_logistic(x, y, signs=[1, 1], l2=1e-3)
    assert lg2.weights[1] == pytest.approx(0.0, abs=1e-9) and lg2.weights[0] > 0
    p = lg2(np.array([[0.0, -2.0], [0.0, 0.0], [0.0, 2.0]]))
    assert p[0] == pytest.approx(p[1]) == pytest.approx(p[2])


def test_ece_precision_and_bins_on_known_answers():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0, 1, 50000)
    right = rng.uniform(0, 1, conf.size) < conf
    assert expected_calibration_error(conf, right) < 0.02  # calibrated by construction
    # always 90 % sure, right half the time: ECE 0.4
    assert expected_calibration_error(np.full(1000, 0.9), np.arange(1000) % 2 == 0) == pytest.approx(0.4)
    p, c = precision_coverage([0.9, 0.6, 0.4, 0.1], [True, False, True, False], 0.5)
    assert (p, c) == (0.5, 0.5)
    p, c = precision_coverage([0.1, 0.2], [True, True], 0.8)
    assert np.isnan(p) and c == 0.0
    bins = calibration_bins([0.05, 0.15, 0.95, 1.0], [False, True, True, True], n_bins=10)
    assert [b.n for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    rep = reliability_report([0.9, 0.6, 0.4, 0.1], [True, False, True, False], radius_km=0.1)
    assert rep.precision_at == {"0.5": 0.5, "0.8": 1.0} and rep.coverage_at == {"0.5": 0.5, "0.8": 0.25}
    assert rep.n == 4 and rep.accuracy == 0.5


def _md(rows):
    return pd.DataFrame(rows, columns=["image", "lat", "lon", "flickr_photo_id"])


def test_near_duplicates_leave_out_bursts_only():
    dlat = 1 / 111_195  # one metre of latitude, in degrees
    md = _md([
        ("a", 45.0, 12.0, 1_000_000),  # the query
        ("b", 45.0, 12.0, 9_000_000),  # identical coordinates, far id: one photographer's fixed geotag
        ("c", 45.0 + 10 * dlat, 12.0, 1_000_050),  # 10 m away, adjacent id: the same burst
        ("d", 45.0 + 10 * dlat, 12.0, 5_000_000),  # 10 m away, far id: another visit, kept
        ("e", 45.0 + 100 * dlat, 12.0, 1_000_001),  # adjacent id, 100 m away: another place, kept
        ("f", 45.0 + 30 * dlat, 12.0, 1_000_002),  # adjacent id, 30 m away (> burst_m): kept
    ])
    keys = photo_keys(md)
    assert keys.columns == {"id": "flickr_photo_id"} and keys.times is None and keys.owners is None
    got = near_duplicates(0, md.lat.values, md.lon.values, keys, LeaveOut())
    assert list(got) == [0, 1, 2]
    # a wider burst radius takes f too; without ids only the identical coordinates go
    assert list(near_duplicates(0, md.lat.values, md.lon.values, keys, LeaveOut(burst_m=35))) == [0, 1, 2, 5]
    assert list(near_duplicates(0, md.lat.values, md.lon.values, photo_keys(md[["image", "lat", "lon"]]))) == [0, 1]


def test_near_duplicates_by_capture_time_and_owner():
    dlat = 1 / 111_195
    md = pd.DataFrame(dict(
        image=list("abcd"), lat=[45.0, 45.0 + 5 * dlat, 45.0 + 5 * dlat, 45.0 + 5 * dlat], lon=[12.0] * 4,
        datetaken=["2019-05-01 10:00:00", "2019-05-01 10:20:00", "2019-05-03 10:00:00", "2019-05-03 10:00:00"],
        owner=["x", "y", "x", "z"],
    ))
    keys = photo_keys(md)
    assert set(keys.columns) == {"time", "owner"}
    # b: 20 minutes later; c: the same owner two days later; d: another owner, another day
    assert list(near_duplicates(0, md.lat.values, md.lon.values, keys)) == [0, 1, 2]


def test_decision_and_evidence():
    dlat = 1 / 111.195  # one km of latitude
    lats = 45.0 + dlat * np.array([0.0, 0.02, 0.5, 1.0])
    lons = np.full(4, 12.0)
    sims = np.array([0.9, 0.8, 0.7, 0.6])
    rule = DecisionRule(15, 10, 0.06)
    d = decide_candidates(lats, lons, sims, np.array([5, 30, 40, 0]), rule, knn_sigma_km=0.1)
    assert d.verified and d.best == 2 and np.isnan(d.knn_score)  # 40 inliers alone beat 30 + 5
    d = decide_candidates(lats, lons, sims, np.array([25, 30, 40, 0]), rule, knn_sigma_km=0.1)
    assert d.verified and d.best == 1  # 25 + 30 near candidate 1 (support 15 + 20) beat 40 alone (30)
    ev = evidence_at(d.lat, d.lon, lats, lons, sims, np.array([25, 30, 40, 0]), rule, 0.1, True)
    assert len(ev) == len(EVIDENCE)
    np.testing.assert_allclose(ev, [1, np.log1p(30), np.log1p(15 + 20), np.log1p(40), 1.7 / 3.0, 0.9])
    d = decide_candidates(lats, lons, sims, np.array([3, 2, 1, 0]), rule, knn_sigma_km=0.1)
    assert not d.verified and np.isfinite(d.knn_score)
    d = decide_candidates(lats, lons, sims, np.zeros(4, int), rule, verify=False)
    assert not d.verified and d.best == 0 and np.isnan(d.knn_score)


def _synthetic_self_queries(n=400, k=20, seed=3):
    """A collection along a line where a candidate with many inliers is near the truth: the
    chance of a right answer grows with the inliers, which calibration must find."""
    rng = np.random.default_rng(seed)
    m = 2000
    lats = 45.0 + rng.uniform(0, 0.02, m)  # ~2 km of photos
    lons = np.full(m, 12.0)
    qids = rng.choice(m, n, replace=False)
    ids = np.empty((n, k), np.int64)
    inl = np.empty((n, k), np.int32)
    for r, q in enumerate(qids):
        d = np.abs(lats - lats[q]) * 111.195
        near = np.flatnonzero((d < 0.05) & (np.arange(m) != q))
        far = np.flatnonzero(d > 0.3)
        strength = rng.uniform(0, 1)  # how matchable this photo is
        has_right = rng.uniform() < 0.3 + 0.7 * strength and len(near)
        cand = rng.choice(far, k, replace=False)
        inl[r] = rng.integers(0, 14, k)
        if has_right:
            cand[0] = rng.choice(near)
            inl[r, 0] = int(5 + 60 * strength)
        ids[r] = cand
    sims = np.sort(rng.uniform(0.3, 0.9, (n, k)))[:, ::-1].astype(np.float32)
    return lats, lons, SelfQueries(qids.astype(np.int64), ids, sims, inl, np.zeros(n, np.int32))


def test_fit_calibration_end_to_end_on_synthetic_self_queries(tmp_path):
    lats, lons, sq = _synthetic_self_queries()
    cal = fit_calibration(lats, lons, sq, radius_km=0.1, knn_sigma_km=0.1,
                          grid=[(10, 0, 0.06), (15, 10, 0.06), (20, 10, 0.06)])
    s = cal.stats
    assert s["sample"] == 400 and 0.2 < s["accuracy"] < 0.9
    assert s["cv_ece"] < 0.08  # out of fold, on data drawn like the fit's
    # monotone in the inliers: more inliers at the answer never lower the confidence
    base = np.array([1.0, np.log1p(15), np.log1p(5), np.log1p(8), 0.3, 0.7])
    confs = [float(cal.confidence(np.r_[base[:1], np.log1p(i), base[2:]])[0]) for i in (15, 20, 30, 60)]
    assert confs == sorted(confs) and confs[-1] > confs[0] + 0.2
    # it round-trips through its JSON file
    cal.save(tmp_path / "calibration.json")
    back = Calibration.load(tmp_path / "calibration.json")
    assert back.rule == cal.rule and back.radius_km == 0.1
    np.testing.assert_allclose(back.confidence(base), cal.confidence(base), atol=1e-5)


def test_cross_validated_confidence_is_honest_on_noise():
    # evidence unrelated to the outcome: out-of-fold confidences stay near the base rate
    rng = np.random.default_rng(4)
    ev = rng.normal(size=(600, len(EVIDENCE)))
    right = rng.uniform(size=600) < 0.3
    oof = cross_validated_confidence(ev, right)
    assert abs(oof.mean() - 0.3) < 0.05 and expected_calibration_error(oof, right) < 0.1
    assert np.all((fit_confidence(ev, right)(ev) >= 0) & (fit_confidence(ev, right)(ev) <= 1))


def test_confidence_sentence():
    assert confidence_sentence(0.834, 0.1) == "likely within 100 m: 83%"
    assert confidence_sentence(0.6, 0.1) == "likely within 100 m: 60%"
    assert confidence_sentence(0.3, 2.5) == "possibly within 2.5 km: 30%"
    assert confidence_sentence(0.05, 1) == "unlikely within 1 km: 5%"
    assert "uncalibrated" in confidence_sentence(0.7, 0.1, calibrated=False)

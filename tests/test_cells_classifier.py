"""Adaptive S2 cells, the PlaNet-style cell classifier and the [L]kNN kernel vote."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import s2sphere

from delg_geo.evaluation.cells import Partition, build_partition, default_thresholds, leaf_cell_ids
from delg_geo.evaluation.classifier import CellClassifier, default_smoothing_km, smoothed_targets, train_classifier
from delg_geo.core.geo import haversine_km
from delg_geo.retrieval.knn import knn_vote

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path}")
    return path


def _city_points(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered points over a city about 10 km across, plus a sparse background."""
    rng = np.random.default_rng(seed)
    centres = np.array([[45.43, 12.33], [45.44, 12.34], [45.435, 12.31], [45.42, 12.36], [45.45, 12.30]])
    k = rng.integers(0, len(centres), size=n)
    scale = np.array([0.002, 0.004, 0.001, 0.003, 0.006])[k, None]
    pts = centres[k] + rng.normal(size=(n, 2)) * scale
    background = np.column_stack([rng.uniform(45.40, 45.47, 60), rng.uniform(12.28, 12.38, 60)])
    pts = np.vstack([pts, background])
    return pts[:, 0], pts[:, 1]


# ----------------------------------------------------------------------------------------------
# Partition


@pytest.fixture(scope="module")
def city():
    lats, lons = _city_points()
    return lats, lons, build_partition(lats, lons, t1=60, t2=6)


def test_partition_invariants(city):
    lats, lons, part = city
    assert len(part) > 10
    ids = leaf_cell_ids(lats, lons)
    cell_ids = [s2sphere.CellId.from_token(c.token) for c in part.cells]
    # No kept cell holds more than t1 points (none is at the maximum level here).
    for c, cid in zip(part.cells, cell_ids):
        assert cid.level() == c.level and c.token == cid.to_token()
        assert c.count <= part.t1 or c.level == part.max_level
        assert c.count >= part.t2
    # Each kept cell was reached by splitting a parent that held more than t1 points.
    for c, cid in zip(part.cells, cell_ids):
        if c.level > part.min_level:
            parent = cid.parent(c.level - 1).id()
            in_parent = sum(1 for i in ids if s2sphere.CellId(int(i)).parent(c.level - 1).id() == parent)
            assert in_parent > part.t1
    # Cells are disjoint: none contains another.
    for a in range(len(cell_ids)):
        for b in range(a + 1, len(cell_ids)):
            assert not cell_ids[a].intersects(cell_ids[b])
    # Assignment: counts add up, and each assigned point lies in its cell.
    labels = part.assign(lats, lons)
    assigned = labels >= 0
    assert part.counts.sum() == assigned.sum()
    np.testing.assert_array_equal(np.bincount(labels[assigned], minlength=len(part)), part.counts)
    for i in np.flatnonzero(assigned):
        assert cell_ids[labels[i]].contains(s2sphere.CellId(int(ids[i])))
    # The dropped cells are exactly the leaves of the undropped partition with fewer than t2 points.
    full = build_partition(lats, lons, t1=part.t1, t2=0)
    kept = {c.token for c in part.cells}
    dropped = [c for c in full.cells if c.token not in kept]
    assert dropped and all(c.count < part.t2 for c in dropped)
    assert kept <= {c.token for c in full.cells}
    assert sum(c.count for c in dropped) == (~assigned).sum()
    assert full.counts.sum() == len(lats)


def test_partition_stops_at_max_level():
    lats = np.full(30, 45.4371)
    lons = np.full(30, 12.3326)
    part = build_partition(lats, lons, t1=10, t2=1, max_level=18)
    assert len(part) == 1
    assert part.cells[0].level == 18 and part.cells[0].count == 30
    np.testing.assert_array_equal(part.assign(lats, lons), np.zeros(30, dtype=int))


def test_centre_of_mass_hand_example():
    # Three points on the equator, all on S2 face 0: the mean of the unit vectors of lon 0, 0, 40
    # is (2 + cos 40, sin 40, 0) / 3, at longitude atan(sin 40 / (2 + cos 40)).
    part = build_partition([0.0, 0.0, 0.0, 10.0, -10.0], [0.0, 0.0, 40.0, 150.0, 150.0], t1=100, t2=1)
    assert [c.level for c in part.cells] == [0, 0]
    by_count = {c.count: c for c in part.cells}
    expected = math.degrees(math.atan2(math.sin(math.radians(40)), 2 + math.cos(math.radians(40))))
    assert by_count[3].lat == pytest.approx(0.0, abs=1e-9)
    assert by_count[3].lon == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(13.08, abs=0.01)
    assert by_count[2].lat == pytest.approx(0.0, abs=1e-9)
    assert by_count[2].lon == pytest.approx(150.0, abs=1e-9)


def test_assign_outside_every_cell_is_minus_one(city):
    _, _, part = city
    labels = part.assign([-33.86, 45.43], [151.21, 12.33])
    assert labels[0] == -1


def test_csv_round_trip(city, tmp_path):
    _, _, part = city
    path = tmp_path / "cells.csv"
    part.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[2] == "class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean"
    back = Partition.from_csv(path)
    assert back.cells == part.cells
    assert (back.t1, back.t2, back.num_images) == (part.t1, part.t2, part.num_images)


def test_geoestimation_cells_file():
    folder = _shared("im2gps_meta", "geo-cells")
    files = sorted(folder.glob("cells_*_*.csv"))
    if not files:
        pytest.skip(f"../shared/data not found: no cells_*.csv in {folder}")
    path = files[-1]
    t2, t1 = (int(x) for x in path.stem.split("_")[1:3])
    lines = path.read_text().splitlines()
    header_images = int(lines[0].split(":")[1])
    rows = [line for line in lines[3:] if line.strip()]
    part = Partition.from_csv(path)
    assert len(part) == len(rows)
    assert part.num_images == header_images
    assert part.counts.sum() <= header_images
    assert part.counts.min() >= t2
    assert part.cells[0].token == rows[0].split(",")[1]
    # Centres of mass lie inside their own (convex) cells.
    labels = part.assign(part.lats, part.lons)
    assert np.mean(labels == np.arange(len(part))) > 0.99
    # A point of the Im2GPS test set falls in some cell (the Eiffel tower area is dense in MP-16).
    assert part.assign([48.8584], [2.2945])[0] >= 0


def test_default_thresholds_venice():
    import pandas as pd

    ref = pd.read_csv(_shared("venice", "reference.csv"))
    t1, t2 = default_thresholds(ref["lat"], ref["lon"])
    part = build_partition(ref["lat"], ref["lon"], t1, t2)
    assert 0 < t2 < t1
    assert 20 <= len(part) <= 100, (t1, t2, len(part))


def test_default_thresholds_scale():
    lats, lons = _city_points()
    t1, t2 = default_thresholds(lats, lons)
    assert 1 <= t2 < t1 < len(lats)
    # A tight cluster (one square, 100 m) gets one or a few cells however many photos it has.
    rng = np.random.default_rng(1)
    la, lo = 45.43 + rng.uniform(0, 0.0009, 4000), 12.33 + rng.uniform(0, 0.0013, 4000)
    t1, t2 = default_thresholds(la, lo)
    assert len(build_partition(la, lo, t1, t2)) <= 4


# ----------------------------------------------------------------------------------------------
# Classifier


def _descriptors(labels: np.ndarray, k: int, dims: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(k + 1, dims)).astype(np.float32)
    x = codes[np.where(labels >= 0, labels, k)] + noise * rng.normal(size=(len(labels), dims)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(city):
    lats, lons, part = city
    rng = np.random.default_rng(3)
    idx = rng.choice(len(lats), size=2000, replace=True)
    lats, lons = lats[idx], lons[idx]
    labels = part.assign(lats, lons)
    x = _descriptors(labels, len(part), 1280, noise=4.0, seed=4)  # per-dimension SNR 1/16
    t0 = time.perf_counter()
    clf = train_classifier(x, lats, lons, part, seed=0)
    seconds = time.perf_counter() - t0
    return clf, x, lats, lons, labels, seconds


def test_classifier_accuracy_and_speed(trained):
    clf, x, lats, lons, labels, seconds = trained
    assert seconds < 30.0
    k = clf.num_classes
    assert clf.dims == 1280
    info = clf.info
    assert info["val_accuracy"] is not None and info["val_accuracy"] > 0.75
    assert info["chance_accuracy"] < 0.2
    lat, lon, conf = clf.predict_latlon(x)
    assert lat.shape == lon.shape == conf.shape == (len(x),)
    assert np.all((conf > 0) & (conf <= 1))
    top = clf.predict(x[:10], top_k=5)
    assert len(top) == 10
    for idx, p in top:
        assert idx.shape == p.shape == (5,)
        assert np.all(np.diff(p) <= 0) and np.all((idx >= 0) & (idx < k))
    hit = labels >= 0
    pred = np.array([t[0][0] for t in clf.predict(x)])
    assert np.mean(pred[hit] == labels[hit]) > 0.9


def test_classifier_save_load_round_trip(trained, tmp_path):
    clf, x, *_ = trained
    clf.save(tmp_path / "clf")
    names = sorted(p.name for p in (tmp_path / "clf").iterdir())
    assert names == ["classifier.json", "partition.csv", "weights.npz"]
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["dims"] == 1280 and meta["t1"] == 60 and meta["t2"] == 6
    assert "val_accuracy" in meta and meta["training"]["seed"] == 0
    with np.load(tmp_path / "clf" / "weights.npz", allow_pickle=False) as z:
        assert all(z[k].dtype == np.float32 for k in z.files)
    back = CellClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(back.predict_proba(x), clf.predict_proba(x))
    for a, b in zip(back.predict_latlon(x[:50]), clf.predict_latlon(x[:50])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        back.predict(x[:, :100])


def test_classifier_deterministic_and_smoothing(city):
    lats, lons, part = city
    labels = part.assign(lats, lons)
    x = _descriptors(labels, len(part), 64, noise=0.1, seed=5)
    kw = dict(epochs=8, label_smoothing_km="auto", hidden=32, seed=7)
    a = train_classifier(x, lats, lons, part, **kw)
    b = train_classifier(x, lats, lons, part, **kw)
    for key in a.weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key])
    assert a.info["training"]["label_smoothing_km"] == pytest.approx(default_smoothing_km(part))
    # With smoothing, photos outside every kept cell are used too.
    assert a.info["training"]["n_train"] + a.info["training"]["n_val"] == len(lats)


def test_label_smoothing_distribution(city):
    lats, lons, part = city
    labels = part.assign(lats, lons)
    tau = default_smoothing_km(part)
    assert 0.005 < tau < 1.0  # city scale: metres to hundreds of metres
    y = smoothed_targets(lats, lons, part, tau)
    assert y.shape == (len(lats), len(part))
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    d = haversine_km(lats[:, None], lons[:, None], part.lats[None], part.lons[None])
    np.testing.assert_array_equal(np.argmax(y, axis=1), np.argmin(d, axis=1))
    # Concentrated near the true cell: mass within 3 tau of the nearest centre dominates ...
    near = d <= d.min(axis=1, keepdims=True) + 3 * tau
    assert np.mean((y * near).sum(axis=1)) > 0.9
    # ... most photos give their own cell the largest share, and shrinking tau sharpens it.
    hit = labels >= 0
    own = y[hit, labels[hit]]
    assert np.mean(np.argmax(y[hit], axis=1) == labels[hit]) > 0.7
    sharp = smoothed_targets(lats, lons, part, tau / 10)[hit, labels[hit]]
    assert sharp.mean() > own.mean()
    # Monotone in distance for a single photo.
    order = np.argsort(d[0])
    assert np.all(np.diff(y[0, order]) <= 1e-7)
    with pytest.raises(ValueError):
        smoothed_targets(lats, lons, part, 0.0)


# ----------------------------------------------------------------------------------------------
# kNN vote


def test_knn_vote_prefers_dense_cluster_over_outlier():
    # Top-1 is a very similar photo 2 km away; four less similar ones agree on one square.
    lats = np.array([45.4500, 45.43410, 45.43420, 45.43405, 45.43415])
    lons = np.array([12.3500, 12.33880, 12.33890, 12.33870, 12.33895])
    sims = np.array([0.95, 0.55, 0.5, 0.5, 0.45])
    lat, lon, score = knn_vote(lats, lons, sims, sigma_km=0.1)
    assert haversine_km(lat, lon, 45.43412, 12.33884) < 0.015
    assert haversine_km(lat, lon, lats[0], lons[0]) > 1.5
    assert score == pytest.approx(2.0 / 2.95, abs=0.02)
    lat2, lon2, _ = knn_vote(lats, lons, sims, sigma_km=0.1, refine=False)
    assert (lat2, lon2) in set(zip(lats[1:], lons[1:]))
    # A tiny bandwidth makes every photo its own cluster: the most similar wins.
    lat3, lon3, _ = knn_vote(lats, lons, sims, sigma_km=0.0001)
    assert (lat3, lon3) == pytest.approx((lats[0], lons[0]))


def test_knn_vote_edge_cases():
    lat, lon, score = knn_vote([45.0], [12.0], [0.7], sigma_km=1.0)
    assert (lat, lon) == pytest.approx((45.0, 12.0)) and score == pytest.approx(1.0)
    lat, lon, score = knn_vote([45.0, 46.0], [12.0, 13.0], [0.0, -0.2], sigma_km=1.0)
    assert (lat, lon, score) == (45.0, 12.0, 0.0)
    lat, lon, _ = knn_vote([np.nan, 46.0], [12.0, 13.0], [0.9, 0.5], sigma_km=1.0)
    assert (lat, lon) == pytest.approx((46.0, 13.0))
    with pytest.raises(ValueError):
        knn_vote([45.0], [12.0, 13.0], [0.5], sigma_km=1.0)
    with pytest.raises(ValueError):
        knn_vote([45.0], [12.0], [0.5], sigma_km=0.0)


def test_knn_vote_two_scales_for_a_world_collection():
    """A world index votes at 25 km: the fine vote then picks the best spot inside the winning
    city instead of the city's weighted centre, and leaves the region choice alone."""
    from delg_geo.retrieval.knn import fine_scale, vote_scales

    # Venice: a strong pair at one square, three single photos across the city; plus two photos
    # in Paris that together outweigh any single Venice spot but not Venice as a whole.
    lats = np.array([45.43412, 45.43415, 45.4380, 45.4300, 45.4400, 48.8566, 48.8570])
    lons = np.array([12.33884, 12.33890, 12.3300, 12.3450, 12.3200, 2.3522, 2.3530])
    sims = np.array([0.40, 0.38, 0.30, 0.30, 0.30, 0.45, 0.45])
    coarse_lat, coarse_lon, score = knn_vote(lats, lons, sims, sigma_km=25.0)
    assert 0.2 < haversine_km(coarse_lat, coarse_lon, 45.43412, 12.33884) < 2  # the city's centre
    lat, lon, score2 = knn_vote(lats, lons, sims, sigma_km=25.0, fine_sigma_km=0.1)
    assert haversine_km(lat, lon, 45.43412, 12.33884) < 0.01  # the square
    assert score2 == pytest.approx(score) and score == pytest.approx(1.68 / 2.58, abs=0.01)
    # fine-only inside the region: Paris's pair is the densest 100 m spot overall, yet Venice wins
    assert haversine_km(*knn_vote(lats, lons, sims, sigma_km=0.1)[:2], 48.8568, 2.3526) < 0.1
    # the bandwidths: a Venice-size collection keeps one scale, a world one gets the fine vote
    assert fine_scale(0.096, 0.1) is None and fine_scale(25.0, 0.1) == 0.1
    world = vote_scales(np.r_[lats, -33.86, 40.7], np.r_[lons, 151.2, -74.0], 0.1)
    assert world == (25.0, 0.1)

"""Distances, accuracy summaries, published Im2GPS results, tables and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from delg_geo.core.errors import MetadataError
from delg_geo.evaluation.metrics import (
    DEFAULT_RADII_KM,
    IM2GPS_RADII_KM,
    MethodSummary,
    error_cdf_png,
    format_table,
    published_errors_km,
    radius_key,
    radius_label,
    read_published_results,
    summarize,
)
from delg_geo.core.geo import EARTH_RADIUS_KM, haversine_km, valid_latlon, weighted_centroid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = DATA / "im2gps_meta" / "results"
SKIP_MSG = "../shared/data not found: real-data test needs the shared data folder"
RESULT_FILES = sorted(RESULTS.glob("*/*.csv")) if RESULTS.is_dir() else []


def _need_data():
    if not RESULTS.is_dir():
        pytest.skip(SKIP_MSG)


# ------------------------------------------------------------------ haversine and friends


def test_haversine_paris_london():
    d = haversine_km(48.8566, 2.3522, 51.5074, -0.1278)
    assert isinstance(d, float)
    assert d == pytest.approx(343.5, abs=0.5)
    assert haversine_km(51.5074, -0.1278, 48.8566, 2.3522) == pytest.approx(d, rel=1e-12)


def test_haversine_antipodes_and_zero():
    half = math.pi * EARTH_RADIUS_KM
    assert haversine_km(0, 0, 0, 180) == pytest.approx(half, rel=1e-9)
    assert haversine_km(90, 0, -90, 0) == pytest.approx(half, rel=1e-9)
    assert haversine_km(40.0, -74.0, -40.0, 106.0) == pytest.approx(half, rel=1e-6)
    assert haversine_km(45.4, 12.3, 45.4, 12.3) == 0.0


def test_haversine_small_distances_and_antimeridian():
    # one degree of latitude, 1 m, and a short hop across the antimeridian
    assert haversine_km(0, 0, 1, 0) == pytest.approx(math.pi * EARTH_RADIUS_KM / 180, rel=1e-12)
    one_m = 0.001 / EARTH_RADIUS_KM * 180 / math.pi
    assert haversine_km(45, 10, 45 + one_m, 10) == pytest.approx(0.001, rel=1e-6)
    assert haversine_km(0, 179.95, 0, -179.95) == pytest.approx(
        haversine_km(0, 0, 0, 0.1), rel=1e-9
    )


def test_haversine_vectorised_and_nan():
    lat1 = np.array([48.8566, 0.0, np.nan])
    lon1 = np.array([2.3522, 0.0, 0.0])
    d = haversine_km(lat1, lon1, 51.5074, -0.1278)
    assert isinstance(d, np.ndarray) and d.shape == (3,)
    assert d[0] == pytest.approx(343.556, abs=0.01)
    assert np.isnan(d[2])
    grid = haversine_km(
        np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((1, 4)), np.arange(4.0)[None, :]
    )
    assert grid.shape == (2, 4)


def test_valid_latlon():
    assert valid_latlon(45.0, 12.0)
    assert valid_latlon(-90, 180) and valid_latlon(90, -180)
    assert valid_latlon("45.1", "12")
    for lat, lon in [
        (95, 0),
        (0, 180.5),
        (float("nan"), 0),
        (0, float("inf")),
        (None, 0),
        ("x", 0),
        (True, 0),
        (-90.0001, 0),
    ]:
        assert not valid_latlon(lat, lon), (lat, lon)


def test_weighted_centroid():
    lat, lon = weighted_centroid([10, 10], [179.9, -179.9])  # across the antimeridian
    assert abs(abs(lon) - 180) < 1e-9 and lat == pytest.approx(10, abs=1e-3)
    lat, lon = weighted_centroid([0, 0], [0, 90], [1, 3])
    assert lat == pytest.approx(0, abs=1e-12)
    assert lon == pytest.approx(math.degrees(math.atan2(3, 1)))
    assert weighted_centroid([45.4], [12.3]) == pytest.approx((45.4, 12.3))
    lat, lon = weighted_centroid([45.0, 45.0, 45.0], [12.0, 12.0, 13.0], [1, 1, 0])
    assert (lat, lon) == pytest.approx((45.0, 12.0))
    with pytest.raises(ValueError):
        weighted_centroid([], [])
    with pytest.raises(ValueError):
        weighted_centroid([0, 0], [0, 180])  # antipodes cancel
    with pytest.raises(ValueError):
        weighted_centroid([0, 1], [0, 1], [0, 0])
    with pytest.raises(ValueError):
        weighted_centroid([0, 1], [0, 1], [1, -1])
    with pytest.raises(ValueError):
        weighted_centroid([95], [0])


# ------------------------------------------------------------------ summaries


def test_radius_key_and_label():
    assert [radius_key(r) for r in DEFAULT_RADII_KM] == [
        "0.025",
        "0.1",
        "0.25",
        "1",
        "25",
        "200",
        "750",
        "2500",
    ]
    assert radius_key(2500.0) == "2500" and radius_key(1e6) == "1000000"
    assert radius_label(0.025) == "25 m" and radius_label(0.1) == "100 m"
    assert radius_label(1) == "1 km" and radius_label(2500) == "2500 km"
    with pytest.raises(ValueError):
        radius_key(-1)


def test_summarize_hand_made():
    errors = [0.01, 0.025, 0.5, 1.0, 3.0, 25.0, 300.0, 20000.0]
    s = summarize(errors, seconds=4.0)
    assert isinstance(s, MethodSummary)
    assert s.n == 8
    assert s.median_km == pytest.approx(2.0)
    assert s.mean_km == pytest.approx(sum(errors) / 8)
    assert s.queries_per_s == pytest.approx(2.0)
    assert list(s.accuracy_at_km) == [radius_key(r) for r in DEFAULT_RADII_KM]
    # <= : an error exactly on a radius counts as inside it
    assert s.accuracy_at_km["0.025"] == pytest.approx(2 / 8)
    assert s.accuracy_at_km["0.1"] == pytest.approx(2 / 8)
    assert s.accuracy_at_km["0.25"] == pytest.approx(2 / 8)
    assert s.accuracy_at_km["1"] == pytest.approx(4 / 8)
    assert s.accuracy_at_km["25"] == pytest.approx(6 / 8)
    assert s.accuracy_at_km["200"] == pytest.approx(6 / 8)
    assert s.accuracy_at_km["750"] == pytest.approx(7 / 8)
    assert s.accuracy_at_km["2500"] == pytest.approx(7 / 8)
    assert s.accuracy(25) == s.accuracy_at_km["25"]
    with pytest.raises(KeyError):
        s.accuracy(10)
    assert s.to_dict()["n"] == 8


def test_summarize_failures_timing_and_bad_input():
    s = summarize([0.5, np.inf], radii=(1,))
    assert s.accuracy_at_km == {"1": 0.5} and math.isinf(s.mean_km) and s.queries_per_s is None
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.median_km)
    assert all(math.isnan(v) for v in empty.accuracy_at_km.values())
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError):
        summarize([-1.0])
    with pytest.raises(ValueError):
        summarize([1.0], seconds=-1)


def test_format_table():
    a = summarize([0.01, 0.2, 3.0, 30.0], seconds=2.0)
    b = summarize([0.4, 0.5, 0.6], radii=(1, 25))
    md = format_table({"DELG": a, "centroid": b}, DEFAULT_RADII_KM)
    lines = md.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| Method | n | 25 m | 100 m | 250 m | 1 km | 25 km |")
    assert "queries/s" in lines[0]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    row_a = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row_a[:4] == ["DELG", "4", "25.0", "25.0"]
    assert row_a[5] == "50.0" and row_a[6] == "75.0"  # 1 km, 25 km
    assert row_a[-3] == "1.6 km" and row_a[-1] == "2.00"  # median (0.2+3)/2 km; 4 queries / 2 s
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_b[2] == "–"  # 25 m not computed for b
    assert row_b[5] == "100.0"
    assert row_b[-3] == "500 m" and row_b[-1] == "–"


def test_error_cdf_png(tmp_path):
    rng = np.random.default_rng(0)
    out = error_cdf_png(
        {"a": rng.lognormal(0, 2, 50), "b": np.array([0.0, 1.0, np.inf]), "empty": np.array([])},
        tmp_path / "plots" / "cdf.png",
    )
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# ------------------------------------------------------------------ published results


def test_read_published_results_synthetic(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(
        b"img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance\r\n"
        b"a.jpg,0.0,0.0,0.0,0.0,0.00\r\n"
        b"b.jpg,0.0,0.0,0.0,1.0,111.19\r\n"
        b"\r\n"
        b"street acc (1km),city acc (25km),region acc (200km),country acc (750km),"
        b"continent acc (2500km),mean deviation (km)\r\n"
        b"0.5,0.5,1.0,1.0,1.0,55.6\r\n"
    )
    df, summary = read_published_results(p)
    assert len(df) == 2 and summary["n"] == 2
    assert summary["accuracy_at_km"] == {"1": 0.5, "25": 0.5, "200": 1.0, "750": 1.0, "2500": 1.0}
    assert summary["mean_km"] == 55.6
    assert published_errors_km(df, recompute=True)[1] == pytest.approx(111.19, abs=0.01)

    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MetadataError, match="missing column"):
        read_published_results(tmp_path / "bad.csv")
    with pytest.raises(MetadataError, match="not found"):
        read_published_results(tmp_path / "nope.csv")


def test_published_result_files_present():
    _need_data()
    names = {f"{p.parent.name}/{p.stem}" for p in RESULT_FILES}
    assert len(RESULT_FILES) == 12
    assert "im2gps/base_M-fstar" in names and "im2gps3k/ISNs_M-fstar-S3" in names


@pytest.mark.shared
@pytest.mark.parametrize(
    "path",
    RESULT_FILES or [None],
    ids=lambda p: "no-data" if p is None else f"{p.parent.name}/{p.stem}",
)
def test_published_summary_reproduced(path):
    """Accuracy at 1/25/200/750/2500 km from the per-image rows equals the published summary
    (to 0.1 point), both from the rounded distance column and recomputed from the coordinates."""
    if path is None:
        pytest.skip(SKIP_MSG)
    df, published = read_published_results(path)
    expected_n = 237 if path.parent.name == "im2gps" else 2997
    assert len(df) == expected_n
    assert set(published["accuracy_at_km"]) == {radius_key(r) for r in IM2GPS_RADII_KM}

    column = published_errors_km(df)
    recomputed = published_errors_km(df, recompute=True)
    # the column is the 6371 km haversine distance rounded to 0.01 km
    assert np.max(np.abs(recomputed - column)) <= 0.0051

    for errs in (column, recomputed):
        s = summarize(errs, radii=IM2GPS_RADII_KM)
        for key, value in published["accuracy_at_km"].items():
            assert 100 * s.accuracy_at_km[key] == pytest.approx(100 * value, abs=0.1), key
        assert s.mean_km == pytest.approx(published["mean_km"], abs=0.01)


def test_published_base_m_fstar_im2gps():
    _need_data()
    df, _ = read_published_results(RESULTS / "im2gps" / "base_M-fstar.csv")
    s = summarize(published_errors_km(df, recompute=True), radii=IM2GPS_RADII_KM)
    assert s.n == 237
    got = [round(100 * s.accuracy(r), 1) for r in IM2GPS_RADII_KM]
    assert got == [15.2, 40.9, 51.5, 65.4, 78.5]
    table = format_table({"base_M-fstar": s}, IM2GPS_RADII_KM)
    assert "| base_M-fstar | 237 | 15.2 | 40.9 | 51.5 | 65.4 | 78.5 |" in table


def test_published_needs_less_or_equal_on_rounded_column():
    """Why accuracy uses <=: the published column is rounded to 0.01 km, and a row reading
    1.00 (true error 0.998 km) counts inside 1 km in the published summary."""
    _need_data()
    df, published = read_published_results(RESULTS / "im2gps3k" / "ISNs_M-fstar-S3.csv")
    col = published_errors_km(df)
    assert np.mean(col <= 1) == pytest.approx(published["accuracy_at_km"]["1"], abs=5e-7)
    assert np.mean(col < 1) != pytest.approx(published["accuracy_at_km"]["1"], abs=5e-7)

"""End to end on real Venice photos: build, resume, refuse, query, verify."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from delg_geo.core.errors import DelgGeoError, IndexFormatError
from delg_geo.core.geo import haversine_km
from delg_geo.index.geo_index import GeoIndex, read_manifest

N_REF = 150
N_QUERY = 15


class CountingExtractor:
    """Wraps an extractor; counts images and can simulate Ctrl-C after ``stop_after`` images."""

    def __init__(self, inner, stop_after: int | None = None):
        self.inner = inner
        self.stop_after = stop_after
        self.count = 0
        self._lock = __import__("threading").Lock()
        for a in ("model_id", "fingerprint", "global_dim", "local_dim", "max_side", "needs_whitening", "config"):
            setattr(self, a, getattr(inner, a))

    def extract_batch(self, images):
        with self._lock:
            if self.stop_after is not None and self.count + len(images) > self.stop_after:
                raise KeyboardInterrupt
            self.count += len(images)
        return self.inner.extract_batch(images)

    def extract(self, image):
        return self.extract_batch([image])[0]


def _subset(tmp_path_factory):
    """References near the queries: the queries' true nearest photos are in the subset."""
    venice = shared_path("venice")
    ref = pd.read_csv(venice / "reference.csv")
    q = pd.read_csv(venice / "queries.csv").iloc[::14].head(N_QUERY).reset_index(drop=True)
    d = haversine_km(q.lat.values[:, None], q.lon.values[:, None], ref.lat.values[None], ref.lon.values[None])
    near = np.unique(np.argsort(d, axis=1)[:, :6].ravel())
    rest = np.setdiff1d(np.arange(len(ref)), near)[:: max(1, len(ref) // N_REF)]
    chosen = np.concatenate([near, rest])[:N_REF]
    out = tmp_path_factory.mktemp("venice_subset")
    ref.iloc[np.sort(chosen)].to_csv(out / "reference.csv", index=False)
    q.to_csv(out / "queries.csv", index=False)
    return venice, out / "reference.csv", q


@pytest.fixture(scope="module")
def built(tmp_path_factory, lite_extractor):
    from index_builder.assemble import CompactOptions
    from index_builder.build import BuildOptions, build_index

    venice, ref_csv, q = _subset(tmp_path_factory)
    index_dir = tmp_path_factory.mktemp("idx") / "venice"
    counting = CountingExtractor(lite_extractor)
    opts = BuildOptions(progress=False, part_size=32, compact=CompactOptions(keep_raw=True))
    rep = build_index(venice, index_dir, ref_csv, extractor=counting, options=opts, log=lambda m: None)
    return dict(venice=venice, ref_csv=ref_csv, queries=q, index_dir=index_dir, report=rep, extracted=counting.count)


def test_build_writes_a_complete_index(built):
    m = read_manifest(built["index_dir"])
    assert m.num_images == N_REF == built["report"].num_images == built["extracted"]
    assert m.model_id == "efficientnet-lite0" and m.global_dim == 1280 and m.local_dim == 112
    assert m.format_version == 2 and m.num_local_features == N_REF * 500
    assert m.whitening["kind"] == "pca" and m.whitening["dim"] == N_REF - 1  # at most 256, at most N - 1
    assert m.index_type == "flat" and m.search["type"] == "flat"
    assert m.local["kind"] == "pca-int8" and m.local["dim"] == 48 and m.local["max_features"] == 500
    # every file the manifest lists, but those of a fixed size (whitening, codec, the ASMK codebook
    # and its per-word offsets) and the --keep-raw copy: <= 32 KB an image, the inverted file included
    shared = ("whitening.npz", "local_codec.npz", "global_raw.npy", "asmk_codebook.npz", "asmk_offsets.npy")
    per_image = {k: v for k, v in m.files.items() if k not in shared}
    assert 20_000 < sum(per_image.values()) / N_REF <= 32 * 1024, per_image
    asmk = (m.files["asmk_ids.npy"] + m.files["asmk_sigs.npy"] + m.files["asmk_counts.npy"]) / N_REF
    assert m.asmk["kind"] == "asmk-binary" and 1000 < asmk <= 5500, asmk  # 4 + 6 bytes per (image, word)
    md = pd.read_csv(built["index_dir"] / "metadata.csv")
    assert list(md.columns[:5]) == ["id", "image", "path", "lat", "lon"] and "flickr_photo_id" in md.columns
    idx = GeoIndex(built["index_dir"])
    kp, desc = idx.local_features(3)
    assert kp.shape == (500, 2) and desc.shape == (500, 48)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert idx.local.codes.dtype == np.int8 and isinstance(idx.local.codes, np.memmap)
    assert isinstance(idx.global_vectors, np.memmap) and idx.global_vectors.dtype == np.float16
    raw = np.load(built["index_dir"] / "global_raw.npy")  # --keep-raw: the model's descriptors, as they were
    np.testing.assert_allclose(idx.search_vectors(), idx.whitening.apply(raw), atol=2e-3)


def test_verification_beats_global_on_real_queries(built, lite_extractor):
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

    geo = Geolocator.from_index(built["index_dir"], config=LocateConfig(top_k=50))
    glob = Geolocator(geo.index, geo.extractor, LocateConfig(top_k=50, verify=False))
    q = built["queries"]
    paths = [str(built["venice"] / p) for p in q.image]
    preds_v = list(geo.locate_many(paths))
    preds_g = [glob.locate_features(geo.extractor.extract(__import__("delg_geo.features.images", fromlist=["x"]).load_image(p, max_side=1024)), p) for p in paths]
    ev = haversine_km(q.lat.values, q.lon.values, np.array([p.lat for p in preds_v]), np.array([p.lon for p in preds_v])) * 1000
    eg = haversine_km(q.lat.values, q.lon.values, np.array([p.lat for p in preds_g]), np.array([p.lon for p in preds_g])) * 1000
    print("within 100 m: verified", int((ev <= 100).sum()), "global", int((eg <= 100).sum()),
          "medians", round(float(np.median(ev))), round(float(np.median(eg))), "inliers", [p.inliers for p in preds_v])
    assert all(p.method == "global" for p in preds_g)
    n_verified = sum(p.method == "verified" for p in preds_v)
    assert n_verified >= 5, [p.inliers for p in preds_v]
    # verification must do better than global top-1 on the same queries: never fewer within
    # 100 m, and a smaller median error (the 220-query benchmark checks the 100 m gain itself)
    assert (ev <= 100).sum() >= (eg <= 100).sum(), (np.round(ev), np.round(eg))
    assert np.median(ev) < np.median(eg) and np.median(ev) < 100
    for p in preds_v:
        d = p.to_dict()
        assert set(d) >= {"image", "lat", "lon", "method", "confidence", "inliers", "neighbour", "alternatives", "timings_ms"}
        assert set(d["timings_ms"]) == {"extract", "search", "verify"}
        assert 0 <= p.confidence <= 1
        if p.method == "verified":
            assert p.confidence >= 0.5 and p.inliers >= geo.config.verify_config.min_inliers
        json.dumps(d)
        for a in p.alternatives:
            assert a.distance_km >= geo.config.distinct_km


def test_resume_after_interrupt(built, tmp_path, lite_extractor):
    from index_builder.assemble import CompactOptions
    from index_builder.build import BuildOptions, build_index

    index_dir = tmp_path / "resumed"
    opts = BuildOptions(progress=False, part_size=16, compact=CompactOptions(keep_raw=True))
    small = tmp_path / "small.csv"
    pd.read_csv(built["ref_csv"]).head(40).to_csv(small, index=False)
    with pytest.raises(DelgGeoError, match="--resume"):
        build_index(built["venice"], index_dir, small, extractor=CountingExtractor(lite_extractor, stop_after=36), options=opts, log=lambda m: None)
    # interrupted: the folder must not look like an index
    with pytest.raises(IndexFormatError, match="resume"):
        GeoIndex(index_dir)
    assert not (index_dir / "manifest.json").exists()
    # without --resume it refuses to silently start over
    with pytest.raises(DelgGeoError, match="interrupted build"):
        build_index(built["venice"], index_dir, small, extractor=lite_extractor, options=opts, log=lambda m: None)
    counting = CountingExtractor(lite_extractor)
    rep = build_index(built["venice"], index_dir, small, extractor=counting, resume=True, options=opts, log=lambda m: None)
    # the first window of 32 images was checkpointed (two parts of 16); the rest is redone
    assert rep.resumed == 32 and counting.count == 40 - 32 and rep.num_images == 40
    # same content as the first 40 of the uninterrupted build
    full = np.load(built["index_dir"] / "global_raw.npy")
    got = np.load(index_dir / "global_raw.npy")
    full_md = pd.read_csv(built["index_dir"] / "metadata.csv").set_index("image")
    got_md = pd.read_csv(index_dir / "metadata.csv")
    rows = full_md.loc[got_md.image, "id"].to_numpy()
    np.testing.assert_allclose(got, full[rows], atol=1e-4)
    assert not (index_dir / ".building").exists()


def test_model_mismatch_is_refused(built):
    from delg_geo.retrieval.locate import Geolocator
    from delg_geo.features.models.lite_delg import LiteDelgExtractor

    other = LiteDelgExtractor(gem_p=2.0)  # another fingerprint
    idx = GeoIndex(built["index_dir"])
    with pytest.raises(IndexFormatError, match="built with model"):
        Geolocator(idx, other)


def test_damaged_index_is_refused(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built["index_dir"], copy)
    with open(copy / "local_codes.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IndexFormatError, match="local_codes.npy"):
        GeoIndex(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt manifest"):
        GeoIndex(copy)
    with pytest.raises(IndexFormatError, match="not found"):
        GeoIndex(tmp_path / "nothing")


def test_add_and_skip_bad_rows(built, tmp_path, lite_extractor):
    from index_builder.build import BuildOptions, build_index

    venice = built["venice"]
    base = pd.read_csv(built["ref_csv"])
    first = tmp_path / "first.csv"
    base.head(6).to_csv(first, index=False)
    index_dir = tmp_path / "idx"
    opts = BuildOptions(progress=False)
    build_index(venice, index_dir, first, extractor=lite_extractor, options=opts, log=lambda m: None)
    # second batch: 3 new good rows, one already indexed, plus bad rows of every kind
    (tmp_path / "junk").mkdir()
    bad_img = venice / "images" / "not_there.jpg"
    extra = pd.concat([base.iloc[5:9], pd.DataFrame([
        dict(image="images/not_there.jpg", lat=45.43, lon=12.33),
        dict(image=base.image.iloc[10], lat=95.0, lon=12.3),
        dict(image=base.image.iloc[11], lat=float("nan"), lon=12.3),
        dict(image="../../etc/passwd", lat=45.4, lon=12.3),
    ])], ignore_index=True)
    second = tmp_path / "second.csv"
    extra.to_csv(second, index=False)
    rep = build_index(venice, index_dir, second, extractor=lite_extractor, add=True, options=opts, log=lambda m: None)
    m = read_manifest(index_dir)
    assert m.num_images == 9 and rep.added == 3
    reasons = " | ".join(s["reason"] for s in m.skipped)
    assert len(m.skipped) == 5, reasons
    assert "already in the index" in reasons
    skipped_csv = pd.read_csv(index_dir / "skipped.csv")
    assert len(skipped_csv) == 5
    assert len(m.sources) == 2
    assert not bad_img.exists()


def test_bench_report_on_real_queries(built, tmp_path):
    from delg_geo.evaluation.bench import BenchConfig, run_bench

    q = built["queries"].copy()
    qcsv = tmp_path / "queries.csv"
    # one unreadable query: counted and listed, never dropped silently
    (tmp_path / "images").mkdir()
    for p in q.image:  # a query folder of its own (copies in tmp, never in the project)
        shutil.copy(built["venice"] / p, tmp_path / p)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    q = pd.concat([q, pd.DataFrame([dict(image="images/broken.jpg", lat=45.43, lon=12.33)])], ignore_index=True)
    q.to_csv(qcsv, index=False)
    out = tmp_path / "bench"
    cfg = BenchConfig(top_k=30, sift_top_k=10, progress=False, map=True)
    run_bench(built["index_dir"], qcsv, tmp_path, out, cfg, log=lambda m: None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == N_QUERY and summary["n_failed"] == 1
    assert "broken.jpg" in summary["failed"][0]["img_id"]
    assert set(summary["methods"]) == {"verified", "global", "knn", "classifier", "hybrid", "sift", "oracle", "centroid"}
    for m, d in summary["methods"].items():
        assert set(d["accuracy_at_km"]) >= {"0.025", "0.1", "0.25", "1", "25", "200", "750", "2500"}
        assert d["accuracy_at_km"]["2500"] == 1.0  # every answer is in Venice
        assert d["country_accuracy"] == 1.0
    acc = {m: d["accuracy_at_km"]["0.1"] for m, d in summary["methods"].items()}
    med = {m: d["median_km"] for m, d in summary["methods"].items()}
    # both ends of the table: the oracle is the ceiling, the centroid the floor
    assert acc["oracle"] == max(acc.values()) and med["oracle"] < 0.1
    assert med["centroid"] > med["verified"] and acc["centroid"] <= acc["verified"]
    assert acc["verified"] >= acc["global"]
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:6]) == ["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long", "great_circle_distance"]
    assert len(pred) == 8 * N_QUERY
    v = pred[pred.method == "verified"]
    recomputed = haversine_km(v.gt_lat, v.gt_long, v.predicted_lat, v.predicted_long)
    np.testing.assert_allclose(v.great_circle_distance, recomputed, rtol=1e-9)
    assert (out / "error_cdf.png").stat().st_size > 5000
    assert (out / "bench_map.html").exists()
    # every verified query's candidates are kept for diagnosis, and agree with the predictions
    with np.load(out / "candidates.npz", allow_pickle=False) as z:
        ids, inl = z["ids"], z["inliers"]
        # the global top 30, then what the ASMK inverted file adds (at most as many again)
        assert ids.shape == inl.shape and ids.shape[0] == N_QUERY and 30 < ids.shape[1] <= 60
        assert (ids[:, :30] >= 0).all() and list(z["img_id"]) == list(v.img_id)
        for row in ids:  # no candidate twice
            assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())
    assert all(k in row for k, row in zip(v.inliers, inl))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from diagnose_bench import diagnose

    rep = diagnose(out, built["index_dir"], radius_km=0.1, repeats=2)
    counts = dict(rep["breakdown"])
    assert counts.pop("n_queries") == N_QUERY and sum(counts.values()) == N_QUERY
    # the global top-1 is right exactly when the first candidate is within 100 m
    assert rep["recall_at_k"][1] == pytest.approx(acc["global"])
    r = rep["recall_at_k"]
    assert r[20] >= r[1] and r[ids.shape[1]] >= r[20]  # the global top 20, then every candidate verified
    assert rep["cross_validation"]["default_accuracy"] == pytest.approx(acc["verified"])
    md_text = (out / "summary.md").read_text()
    assert "| verified" in md_text
    # the confidence report: this index has no calibration, and the report says so
    cal = summary["calibration"]
    assert cal["method"] == "verified" and cal["calibrated"] is False and cal["radius_km"] == 0.1
    assert cal["n"] == N_QUERY and sum(b["n"] for b in cal["bins"]) == N_QUERY and 0 <= cal["ece"] <= 1
    assert cal["accuracy"] == pytest.approx(acc["verified"])
    assert set(cal["precision_at"]) == set(cal["coverage_at"]) == {"0.5", "0.8"}
    assert "Calibration of `verified`" in md_text and "uncalibrated score" in md_text
    assert "![reliability](reliability.png)" in md_text and (out / "reliability.png").stat().st_size > 5000
    # a bench only reads the index: its caches (classifier, SIFT features) go under --out
    assert (out / "classifier" / "classifier.json").exists() and (out / "sift_cache").is_dir()
    assert not (built["index_dir"] / "classifier").exists() and not (built["index_dir"] / "sift_cache").exists()
    np.testing.assert_allclose(v.great_circle_distance_km, v.great_circle_distance)


def test_cli_query_json_and_map(built, tmp_path):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app

    q = built["queries"]
    img = str(built["venice"] / q.image.iloc[0])
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    runner = CliRunner()
    res = runner.invoke(app, ["query", img, str(junk), "--index", str(built["index_dir"]), "--top-k", "20", "--json",
                              "--map", str(tmp_path / "m.html"), "--explain", str(tmp_path / "x.png")])
    assert res.exit_code == 1  # one of two images failed
    lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    good = [d for d in lines if "error" not in d]
    bad = [d for d in lines if "error" in d]
    assert len(good) == 1 and len(bad) == 1 and "junk.jpg" in bad[0]["error"]
    d = good[0]
    assert d["method"] in ("verified", "global") and set(d["timings_ms"]) == {"extract", "search", "verify"}
    assert d["place"]["country_code"] == "IT"
    assert haversine_km(d["lat"], d["lon"], 45.4375, 12.3358) < 5
    assert (tmp_path / "m.html").stat().st_size > 10000
    assert (tmp_path / f"x-{Path(img).stem}.png").exists()
    info = runner.invoke(app, ["index", "info", "--index", str(built["index_dir"]), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["num_images"] == N_REF


def test_cli_extract_json(tmp_path):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app

    lund = shared_path("exif_gps", "lund")
    res = CliRunner().invoke(app, ["extract", str(lund / "01.jpg"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["model"] == "efficientnet-lite0" and d["global_dim"] == 1280 and d["local_dim"] == 112
    assert 500 <= d["num_local"] <= 1000 and d["seconds"] > 0


def test_calibration_on_real_photos(built, tmp_path, lite_extractor):
    """Fit the confidence on the subset's own photos, then use it on the real queries."""
    from delg_geo.retrieval.calibrate import CALIBRATION_FILE, Calibration, pinned_geotags, photo_keys
    from delg_geo.retrieval.decision import EVIDENCE, EVIDENCE_SIGNS
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

    index_dir = tmp_path / "venice"
    shutil.copytree(built["index_dir"], index_dir)
    idx = GeoIndex(index_dir)
    eligible = int((~pinned_geotags(idx.lats, idx.lons, photo_keys(idx.metadata))).sum())
    assert 60 <= eligible < N_REF  # the subset holds photos sharing a pinned position, which are not sampled
    cal = __import__("delg_geo.retrieval.calibrate", fromlist=["x"]).calibrate_index(index_dir, sample=N_REF, top_k=30)
    s = cal.stats
    assert s["sample"] == eligible and 0.1 < s["accuracy"] < 0.95
    m = read_manifest(index_dir)
    assert m.confidence_radius_km == 0.1 and m.calibration["file"] == CALIBRATION_FILE
    assert m.calibration["size"] == (index_dir / CALIBRATION_FILE).stat().st_size
    on_disk = json.loads((index_dir / CALIBRATION_FILE).read_text())
    assert on_disk["evidence"] == list(EVIDENCE) and on_disk["rule"] == cal.rule.to_dict()
    assert Calibration.load(index_dir / CALIBRATION_FILE).rule == cal.rule
    # out of fold, the confidence tracks the observed rate on the collection
    assert s["cv_ece"] < 0.2 and abs(s["cv_mean_confidence"] - s["accuracy"]) < 0.1
    # the map is monotone in each piece of evidence, the way its sign says
    rng = np.random.default_rng(0)
    base = np.column_stack([rng.integers(0, 2, 50), rng.uniform(0, 5, (50, 3)), rng.uniform(0, 1, (50, 2))])
    for j, sign in enumerate(EVIDENCE_SIGNS):
        lo, hi = base.copy(), base.copy()
        hi[:, j] += 1.0
        assert np.all(sign * (cal.confidence(hi) - cal.confidence(lo)) >= -1e-9), EVIDENCE[j]
    # a query now gets a probability, in words, and the real queries' answers bear it out
    geo = Geolocator.from_index(index_dir, config=LocateConfig(top_k=30))
    assert geo.calibration is not None and geo.rule == cal.rule
    q = built["queries"]
    preds = list(geo.locate_many([str(built["venice"] / p) for p in q.image]))
    right = haversine_km(q.lat.values, q.lon.values, np.array([p.lat for p in preds]), np.array([p.lon for p in preds])) <= 0.1
    conf = np.array([p.confidence for p in preds])
    assert all(p.calibrated and p.confidence_text.endswith(f"within 100 m: {p.confidence:.0%}") for p in preds)
    print("queries: mean confidence", conf.mean().round(3), "fraction right", right.mean().round(3), conf.round(2), right)
    # this subset holds each query's nearest photos, so its queries are easier than its own photos
    # (the calibration's rate); the confidence must still rank them: right answers above wrong ones
    assert right.any() and not right.all()
    assert conf[right].mean() > conf[~right].mean()
    # the uncalibrated index still answers with a score, and says that it is one
    plain = Geolocator.from_index(built["index_dir"], config=LocateConfig(top_k=30))
    assert plain.calibration is None
    # an index changed after calibrating (here: its manifest's update time) ignores the stale file
    mj = json.loads((index_dir / "manifest.json").read_text())
    mj["updated"] = "2000-01-01T00:00:00+00:00"
    (index_dir / "manifest.json").write_text(json.dumps(mj))
    assert Geolocator(GeoIndex(index_dir), geo.extractor).calibration is None


def test_cli_calibrate_json_and_sentence(built, tmp_path):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app

    index_dir = tmp_path / "venice"
    shutil.copytree(built["index_dir"], index_dir)
    runner = CliRunner()
    img = str(built["venice"] / built["queries"].image.iloc[0])
    res = runner.invoke(app, ["query", img, "--index", str(index_dir), "--top-k", "10"])
    assert res.exit_code == 0, res.output
    assert "(uncalibrated)" in res.stdout and "delg-geo index calibrate" in res.stdout
    res = runner.invoke(app, ["index", "calibrate", "--index", str(index_dir), "--sample", "40", "--top-k", "10",
                              "--confidence-radius-km", "0.25", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["radius_km"] == 0.25 and d["stats"]["sample"] == 40 and set(d["rule"]) == {"min_inliers", "base_inliers", "vote_radius_km"}
    assert read_manifest(index_dir).confidence_radius_km == 0.25
    res = runner.invoke(app, ["query", img, "--index", str(index_dir), "--top-k", "10"])
    assert res.exit_code == 0, res.output
    assert "within 250 m: " in res.stdout and "uncalibrated" not in res.stdout
    js = runner.invoke(app, ["query", img, "--index", str(index_dir), "--top-k", "10", "--json"])
    p = json.loads(js.stdout.strip().splitlines()[-1])
    assert p["calibrated"] is True and p["confidence_radius_km"] == 0.25 and "within 250 m" in p["confidence_text"]
    info = json.loads(runner.invoke(app, ["index", "info", "--index", str(index_dir), "--json"]).stdout)
    assert info["calibration"]["file"] == "calibration.json" and info["calibration"]["radius_km"] == 0.25


def test_cli_build_records_the_confidence_radius(built, tmp_path):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app

    from delg_geo.features.models.local_weights import find_weights

    if find_weights("aliked-n16") is None:
        pytest.skip("the aliked-n16 weights (the default --local) are not installed (`delg-geo model fetch-weights`)")
    small = tmp_path / "small.csv"
    pd.read_csv(built["ref_csv"]).head(8).to_csv(small, index=False)
    runner = CliRunner()
    res = runner.invoke(app, ["index", "build", str(built["venice"]), "--metadata", str(small), "--index",
                              str(tmp_path / "idx"), "--confidence-radius-km", "0.25", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["num_images"] == 8 and rep["calibration"] is None  # too few photos to calibrate on
    assert "not calibrated: 8 images, fewer than the 200" in res.stderr
    m = read_manifest(tmp_path / "idx")
    assert m.confidence_radius_km == 0.25 and m.calibration == {}
    # without --local, the default model's index gets ALIKED-n16 local features (README, "Local
    # features for verification"), and a query matches as many of its own keypoints as the store
    # keeps per image, like the self-queries the calibration fits the vote on
    assert m.local_features == "aliked-n16" and m.local["max_features"] == 500
    assert m.local_config == {"top_k": 1024, "max_side": 1024, "upscale": True}
    from delg_geo.retrieval.locate import Geolocator

    geo = Geolocator.from_index(tmp_path / "idx", places=False)
    assert geo.extractor.local_features == "aliked-n16"
    assert geo.config.verify_config.max_features == m.local["max_features"]
    bad = runner.invoke(app, ["index", "build", str(built["venice"]), "--metadata", str(small), "--index",
                              str(tmp_path / "idx2"), "--confidence-radius-km", "0"])
    assert bad.exit_code != 0 and not (tmp_path / "idx2").exists()


def test_cli_build_sets_the_local_store(built, tmp_path):
    """--local-codec/--local-dim/--max-local reach the compact store and its manifest."""
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app
    from delg_geo.index.geo_index import GeoIndex

    small = tmp_path / "small.csv"
    pd.read_csv(built["ref_csv"]).head(6).to_csv(small, index=False)
    runner = CliRunner()
    res = runner.invoke(app, ["index", "build", str(built["venice"]), "--metadata", str(small), "--index",
                              str(tmp_path / "idx"), "--local-dim", "24", "--max-local", "120", "--json"])
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "idx")
    assert m.local["kind"] == "pca-int8" and m.local["dim"] == 24 and m.local["max_features"] == 120
    idx = GeoIndex(tmp_path / "idx", device="cpu")
    assert idx.local.codes.shape[1] == 24 and int(np.diff(idx.offsets).max()) == 120
    bad = runner.invoke(app, ["index", "build", str(built["venice"]), "--metadata", str(small), "--index",
                              str(tmp_path / "idx2"), "--local-codec", "jpeg"])
    import re

    said = re.sub(r"[\s│╭╮╰╯─]+", " ", bad.output)  # the usage error as rich boxes and wraps it
    assert bad.exit_code == 2 and "'jpeg' is not one of float16, pca-int8, pca-binary, pq" in said
    assert not (tmp_path / "idx2").exists()

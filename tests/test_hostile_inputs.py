"""Hostile inputs of the third round (issue 20): the server, option checks, silently wrong answers,
messages, the first minutes, and tests that could not fail.

Each case asserts the exit code (or the error or HTTP status), the message, and that nothing was
lost: the index is unchanged, nothing half-written is left, the server keeps answering what it can.
The server and query cases use the tiny Venice index of ``_tiny_index`` (20 real photos).
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _tiny_index import tiny_geo  # noqa: F401 (session fixture)
from conftest import REPO
from test_hostile import _flat, run_cli

pytestmark = pytest.mark.shared


def _fingerprint(index: Path) -> dict:
    """Every file of an index folder (recursively) and its bytes' hash: what "nothing lost" compares."""
    return {str(p.relative_to(index)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(index.rglob("*")) if p.is_file()}


@pytest.fixture
def index_copy(tiny_geo, tmp_path) -> Path:
    geo, _, _ = tiny_geo
    dst = tmp_path / "index"
    shutil.copytree(geo.index.path, dst)
    return dst


def _strip_jpeg(w: int = 20000, h: int = 40) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


# -- 1. the server -------------------------------------------------------------------------------------

@pytest.fixture
def client_for():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from delg_geo.apps.serve import create_app

    return lambda geo: TestClient(create_app(geo, preload_places=False))


def test_a_20000_by_40_image_is_refused_with_a_reason(tiny_geo, client_for, tmp_path):
    from delg_geo.core.errors import DelgGeoError, ImageLoadError

    geo, ref, venice = tiny_geo
    strip = tmp_path / "strip.jpg"
    strip.write_bytes(_strip_jpeg())
    client = client_for(geo)
    r = client.post("/api/locate", files={"file": ("strip.jpg", strip.read_bytes(), "image/jpeg")})
    assert r.status_code == 415, r.text
    assert "too elongated to describe (20000x40 pixels" in r.json()["detail"]
    with pytest.raises(ImageLoadError, match=r"strip\.jpg: image too elongated to describe \(20000x40") as e:
        geo.locate(strip)
    assert isinstance(e.value, DelgGeoError)
    # the server keeps answering
    r = client.post("/api/locate", files={"file": ("ok.jpg", (venice / ref.image[4]).read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["neighbour"]["id"] == 4


def test_a_build_lists_a_20000_by_40_image_as_skipped(tmp_path):
    from _fake_extractor import FakeExtractor

    from delg_geo.features.extract import iter_extract

    (tmp_path / "strip.jpg").write_bytes(_strip_jpeg(4000, 20))
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "ok.jpg")
    res = list(iter_extract([tmp_path / "strip.jpg", tmp_path / "ok.jpg"], FakeExtractor()))
    assert not res[0].ok and "too elongated to describe (4000x20 pixels" in res[0].error
    assert res[1].ok


class _FailingExtractor:
    """The tiny index's extractor, whose network refuses every image (as ALIKED does a 1024x2 one)."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def extract(self, image):
        raise ValueError(f"image too small for ALIKED ({image.array.shape[1]}x2)")


def test_a_network_failure_is_a_4xx_and_a_delg_geo_error(tiny_geo, client_for):
    from delg_geo.core.errors import ImageLoadError
    from delg_geo.retrieval.locate import Geolocator

    geo, ref, venice = tiny_geo
    broken = Geolocator(geo.index, _FailingExtractor(geo.extractor))
    r = client_for(broken).post("/api/locate", files={"file": ("a.jpg", (venice / ref.image[1]).read_bytes(), "image/jpeg")})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("not a usable image: feature extraction failed (ValueError: image too small for ALIKED")
    with pytest.raises(ImageLoadError, match="feature extraction failed"):
        broken.locate(venice / ref.image[1])


@pytest.mark.parametrize("change", ["delete folder", "delete a file", "rebuild"])
def test_healthz_reports_an_index_deleted_or_replaced(tiny_geo, client_for, index_copy, tmp_path, change):
    import json

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator

    geo, ref, venice = tiny_geo
    client = client_for(Geolocator(GeoIndex(index_copy), geo.extractor))
    photo = (venice / ref.image[5]).read_bytes()
    assert client.get("/healthz").json() == {"ok": True}
    assert client.post("/api/locate", files={"file": ("a.jpg", photo, "image/jpeg")}).status_code == 200
    if change == "delete folder":
        shutil.rmtree(index_copy)
        expected = "is gone"
    elif change == "delete a file":
        (index_copy / "global.npy").unlink()
        expected = "global.npy is gone"
    else:  # a new build swapped in: same names, new files, a new build id
        m = json.loads((index_copy / "manifest.json").read_text())
        m["build_id"] = "a-newer-build"
        tmp = index_copy / "manifest.json.new"
        tmp.write_text(json.dumps(m))
        tmp.replace(index_copy / "manifest.json")
        expected = "build a-newer-build replaced build"
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["ok"] is False and expected in r.json()["reason"], r.text
    r = client.post("/api/locate", files={"file": ("a.jpg", photo, "image/jpeg")})
    assert r.status_code == 503 and expected in r.json()["detail"] and "restart" in r.json()["detail"]


# -- 2. options checked before any work ------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "Invalid value for '--port'"),
    (["--port", "0"], "Invalid value for '--port'"),
    (["--max-upload-mb", "nan"], "Invalid value for '--max-upload-mb': must be a positive number of megabytes, got nan"),
    (["--max-upload-mb", "-1"], "Invalid value for '--max-upload-mb': must be a positive number of megabytes"),
    (["--max-upload-mb", "0"], "Invalid value for '--max-upload-mb'"),
])
def test_serve_options_are_usage_errors(capsys, tmp_path, args, message):
    code, out, err = run_cli(capsys, "serve", "--index", tmp_path / "none", *args)
    assert code == 2 and out == "" and message in _flat(err), err
    assert "loading" not in err  # refused before anything is loaded
    from delg_geo.apps.serve import run_server
    from delg_geo.core.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):  # the Python API checks the same before loading
        run_server(tmp_path / "none", port=70000 if "--port" in args else 8000,
                   max_upload_mb=float(args[1]) if "--max-upload-mb" in args else 20.0)


def test_bench_radii_are_checked_before_any_query(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "bench", "--index", tmp_path / "none", "--queries", tmp_path / "q.csv",
                             "--out", out_dir, "--radii-km", "1", "--radii-km", "-1")
    assert code == 2 and out == "" and "Invalid value for '--radii-km': -1 is not a positive distance in km" in _flat(err)
    assert not out_dir.exists()
    from delg_geo.core.errors import InvalidArgumentError
    from delg_geo.evaluation.bench import BenchConfig

    for radii in ((-1.0,), (float("nan"),), ()):
        with pytest.raises(InvalidArgumentError, match="radii_km must be positive"):
            BenchConfig(radii_km=radii)


@pytest.mark.parametrize("args, message", [
    (["index", "calibrate", "--seed", "-1"], "Invalid value for '--seed'"),
    (["index", "calibrate", "--sample", "-5"], "Invalid value for '--sample'"),
    (["index", "calibrate", "--sample", "0"], "Invalid value for '--sample'"),
    (["classifier", "train", "--epochs", "-1"], "Invalid value for '--epochs'"),
    (["classifier", "train", "--epochs", "0"], "Invalid value for '--epochs'"),
])
def test_calibrate_and_train_options_leave_the_index_unchanged(capsys, index_copy, args, message):
    before = _fingerprint(index_copy)
    code, out, err = run_cli(capsys, *args, "--index", index_copy)
    assert code == 2 and out == "" and message in _flat(err), err
    assert _fingerprint(index_copy) == before and not (index_copy / "classifier").exists()


def test_train_classifier_api_refuses_no_epochs(index_copy):
    from delg_geo.core.errors import InvalidArgumentError
    from delg_geo.evaluation.bench import train_index_classifier

    before = _fingerprint(index_copy)
    with pytest.raises(InvalidArgumentError, match="epochs must be a whole number of at least 1, got -1"):
        train_index_classifier(index_copy, epochs=-1)
    assert _fingerprint(index_copy) == before


# -- 3. silently wrong -----------------------------------------------------------------------------------

def test_coordinates_with_underscores_or_foreign_digits_are_refused(tmp_path):
    from delg_geo.evaluation.queries import read_queries
    from index_builder.sources import read_metadata

    images = tmp_path / "images"
    images.mkdir()
    for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        Image.new("RGB", (40, 40)).save(images / n)
    (tmp_path / "m.csv").write_text("image,lat,lon\na.jpg,4_5.5,12.3\nb.jpg,45.5,1_2.3\nc.jpg,\u0664\u0665,12\n"
                                    "d.jpg,45.5,12.3\n")
    records, skipped = read_metadata(images, tmp_path / "m.csv")
    assert [r.image for r in records] == ["d.jpg"] and (records[0].lat, records[0].lon) == (45.5, 12.3)
    why = {s.image: (s.row, s.reason) for s in skipped}
    assert why["a.jpg"] == (2, "latitude '4_5.5' is not a number (expected plain decimal notation, e.g. 45.4371)")
    assert why["b.jpg"][0] == 3 and "longitude '1_2.3' is not a number" in why["b.jpg"][1]
    assert why["c.jpg"][0] == 4 and "is not a number" in why["c.jpg"][1]
    # the benchmark's query lists: CSV and Im2GPS
    items, skipped = read_queries(tmp_path / "m.csv", images)
    assert [i.img_id for i in items] == ["d.jpg"] and len(skipped) == 3
    (tmp_path / "im2gps.csv").write_text("IMG_ID,AUTHOR,LAT,LON\na.jpg,x,4_5.5,12\nd.jpg,y,45.5,12.3\n")
    items, skipped = read_queries(tmp_path / "im2gps.csv", images, fmt="im2gps")
    assert [i.img_id for i in items] == ["d.jpg"] and "'4_5.5' is not a number" in skipped[0].reason
    from index_builder.sources import parse_vpr_fields

    assert parse_vpr_fields("@@@@@4_5.5@12.3@p@@@@@@@@.jpg") is None  # float() would read 45.5
    assert parse_vpr_fields("@@@@@45.5@12.3@p@@@@@@@@.jpg")["lat"] == 45.5


@pytest.mark.parametrize("lat, lon, why", [
    ((45.0, 90.0, 0.0), (12.0, 20.0, 6.0), "EXIF GPS latitude is not a valid angle: minutes 90 (must be under 60)"),
    ((45.0, 30.0, 0.0), (12.0, 20.0, 60.0), "EXIF GPS longitude is not a valid angle: seconds 60 (must be under 60)"),
    ((45.0, 59.0, 75.5), (12.0, 0.0, 0.0), "EXIF GPS latitude is not a valid angle: seconds 75.5 (must be under 60)"),
])
def test_exif_minutes_or_seconds_of_60_or_more_are_refused(tmp_path, lat, lon, why):
    from delg_geo.features.exif import read_exif_gps_reason
    from index_builder.sources import read_exif_metadata

    img = Image.new("RGB", (40, 30), (200, 30, 30))
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: lat, 3: "E", 4: lon}
    (tmp_path / "images").mkdir()
    img.save(tmp_path / "images" / "bad.jpg", exif=exif)
    exif[0x8825] = {1: "N", 2: (45.0, 59.0, 59.9), 3: "E", 4: (12.0, 20.0, 6.0)}
    img.save(tmp_path / "images" / "good.jpg", exif=exif)
    assert read_exif_gps_reason(tmp_path / "images" / "bad.jpg") == (None, why)
    (pos, ok) = read_exif_gps_reason(tmp_path / "images" / "good.jpg")
    assert ok == "" and pos[0] == pytest.approx(45 + 59 / 60 + 59.9 / 3600)
    records, skipped = read_exif_metadata(tmp_path / "images")
    assert [r.image for r in records] == ["good.jpg"]
    assert [(s.image, s.reason) for s in skipped] == [("bad.jpg", why)]


#: Held-out Venice queries (not in the tiny index) that no candidate verifies (a global answer) while
#: some candidates have a few inliers; the first of them that answers globally is used.
GLOBAL_QUERIES = ["images/33678094018.jpg", "images/46831061934.jpg", "images/46821759684.jpg",
                  "images/47477625812.jpg", "images/32314490937.jpg"]
VERIFIED_QUERY = "images/46467814704.jpg"  # 20 m from reference 0, about 45 inliers with it


def _captured_drawing(monkeypatch) -> list[dict]:
    """Record what the match pictures say (their caption and label) instead of only drawing them."""
    from delg_geo.apps import explain

    seen: list[dict] = []
    real = explain.draw_explain

    def spy(*args, caption=None, verified=True, **kw):
        seen.append(dict(caption=caption, verified=verified, drawn=len(args[4])))
        return real(*args, caption=caption, verified=verified, **kw)

    monkeypatch.setattr(explain, "draw_explain", spy)
    return seen


def test_explain_says_what_the_answer_is_with_the_answers_own_inliers(tiny_geo, tmp_path, monkeypatch):
    from delg_geo.apps.explain import explain_prediction

    geo, _, venice = tiny_geo
    seen = _captured_drawing(monkeypatch)
    paths = [venice / q for q in [VERIFIED_QUERY] + GLOBAL_QUERIES]
    answers = list(geo.locate_many_with_features(paths))
    kinds = {}
    for pred, feats in answers:
        kinds.setdefault(pred.method, (pred, feats))
    assert set(kinds) == {"verified", "global"}, [p.method for p, _ in answers]
    for method, (pred, feats) in kinds.items():
        assert len(pred.matches) == pred.inliers and "matches" not in pred.to_dict()
        v = explain_prediction(geo, pred.image, pred, tmp_path / f"{method}.png", features=feats)
        assert v.inliers == pred.inliers  # the picture draws the answer's own verification
        said = seen[-1]
        assert said["drawn"] == pred.inliers
        if method == "verified":
            assert said["verified"] and said["caption"] == f"answer: verified neighbour, {pred.inliers} inlier matches"
        else:
            assert not said["verified"] and said["caption"].startswith("answer: global, not verified (no candidate reached")
            assert said["caption"].endswith(f"this photo: {pred.inliers} inlier matches")
            # the note names the candidate with the most inliers: never fewer than the neighbour's
            m = re.search(r"no candidate reached (\d+) inliers \(the most: (\d+), (\S+)\)", pred.note)
            assert m, pred.note
            assert int(m.group(2)) >= pred.inliers and int(m.group(2)) < int(m.group(1)) == geo.rule.min_inliers
            assert m.group(0) in said["caption"]


def test_query_explain_table_note_and_picture_agree(tiny_geo, tmp_path, capsys, monkeypatch):
    import json

    geo, _, venice = tiny_geo
    seen = _captured_drawing(monkeypatch)
    query = venice / VERIFIED_QUERY
    code, out, err = run_cli(capsys, "query", query, "--index", geo.index.path, "--explain", tmp_path / "m.png")
    assert code == 0, err
    assert "delg-geo: loading the index and the model" in err  # the first minutes: say what takes time
    row = next(line for line in out.splitlines() if line.startswith(query.name))
    inliers = int(row.split()[-3])
    assert seen[-1]["caption"] == f"answer: verified neighbour, {inliers} inlier matches" and seen[-1]["drawn"] == inliers
    assert (tmp_path / "m.png").stat().st_size > 10_000
    code, out, err = run_cli(capsys, "query", query, "--index", geo.index.path, "--json")
    assert code == 0 and "loading" not in err and json.loads(out)["method"] == "verified"


def test_place_names_are_nearest_by_great_circle_distance():
    from delg_geo.core.geo import haversine_km
    from delg_geo.core.places import _load, nearest_place, nearest_places

    # east of the Arsenale: 1.8 km from Venice's point, 2.6 km from Murano's, which is nearer in degrees
    assert nearest_place(45.436, 12.356).name == "Venice"
    _, rows = _load()
    lat = np.array([float(r["lat"]) for r in rows])
    lon = np.array([float(r["lon"]) for r in rows])
    rng = np.random.default_rng(7)
    for band in (0.0, 30.0, 45.4, 60.0, 69.0, -54.0):
        # points near real places at this latitude, where the nearest ones compete
        near = np.flatnonzero(np.abs(lat - band) < 1.5)
        pick = rng.choice(near, size=min(8, len(near)), replace=False)
        qlat = lat[pick] + rng.uniform(-0.05, 0.05, len(pick))
        qlon = lon[pick] + rng.uniform(-0.05, 0.05, len(pick))
        got = nearest_places(qlat, qlon)
        for a, b, p in zip(qlat, qlon, got):
            d = haversine_km(a, b, lat, lon)
            nearest = {(rows[i]["name"], rows[i]["cc"]) for i in np.flatnonzero(d <= d.min() + 1e-6)}  # ties
            assert (p.name, p.country_code) in nearest, (band, a, b, p, nearest)


def test_locate_of_a_bytearray_labels_it_without_the_data(tiny_geo):
    geo, ref, venice = tiny_geo
    data = bytearray((venice / ref.image[2]).read_bytes())
    pred = geo.locate(data)
    assert pred.image == "<bytes>" and pred.neighbour.id == 2
    assert len(repr(pred.to_dict())) < 10_000
    assert geo.locate(bytes(data), name="mine.jpg").image == "mine.jpg"


# -- 4. messages -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jpeg", "zip"])
def test_metadata_that_is_a_jpeg_or_a_zip_is_not_a_csv(tmp_path, capsys, kind, tiny_geo):
    import zipfile

    _, ref, venice = tiny_geo
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(venice / ref.image[0], images / "a.jpg")
    meta = tmp_path / f"meta.{kind}"
    if kind == "jpeg":
        shutil.copy(venice / ref.image[0], meta)
    else:
        with zipfile.ZipFile(meta, "w") as z:
            z.writestr("meta.csv", "image,lat,lon\na.jpg,45.4,12.3\n")
    index = tmp_path / "index"
    code, out, err = run_cli(capsys, "index", "build", images, "--metadata", meta, "--index", index)
    what = "a JPEG image" if kind == "jpeg" else "a ZIP archive; unzip it and pass the CSV inside"
    assert code == 2 and out == ""
    assert f"{meta}: not a CSV file (it is {what})" in err, err
    assert all(c in "\n\t" or 32 <= ord(c) < 127 or ord(c) > 159 for c in err) and "\ufffd" not in err
    assert "columns found" not in err
    assert not (index / "manifest.json").exists()
    assert sorted(p.name for p in images.iterdir()) == ["a.jpg"]


def test_locate_accepts_arrays_pil_images_bytes_and_file_objects(tiny_geo):
    geo, ref, venice = tiny_geo
    path = venice / ref.image[6]
    data = path.read_bytes()
    with Image.open(path) as im:
        im.load()
        pil = im.convert("RGB")
    expected = geo.locate(path)
    assert expected.neighbour.id == 6
    grey16 = (np.asarray(pil.convert("L"), np.uint16) * 257)
    inputs = {
        "PIL RGB": pil, "PIL P": pil.convert("P"), "PIL I;16": Image.fromarray(grey16), "array": np.asarray(pil),
        "memoryview": memoryview(data), "file object": io.BytesIO(data), "open file": open(path, "rb"),
    }
    try:
        for what, src in inputs.items():
            pred = geo.locate(src)
            assert pred.neighbour.id == 6, what
            assert len(pred.image) < 300, what
    finally:
        inputs["open file"].close()
    assert geo.locate(inputs["PIL RGB"]).image == "<PIL image>"


@pytest.mark.parametrize("src, message", [
    (None, "<None>: cannot read an image from None; give a file path (str or pathlib.Path), bytes"),
    ("", "'': empty path; give the path of an image file"),
    (12, "cannot read an image from an object of type int; give a file path"),
    (np.zeros((50, 50), np.float32), "an array of dtype float32 is not an image; expected uint8"),
    (np.zeros((5,), np.uint8), "an array of shape (5,) is not an image"),
    (io.StringIO("text"), "the file object is open in text mode; open it with 'rb'"),
])
def test_locate_refuses_what_is_no_image_listing_what_is_accepted(tiny_geo, src, message):
    from delg_geo.core.errors import ImageLoadError

    geo, _, _ = tiny_geo
    with pytest.raises(ImageLoadError) as e:
        geo.locate(src)
    assert message in str(e.value)
    assert "is a directory" not in str(e.value)


@pytest.mark.parametrize("options, message", [
    (dict(top_k="5"), "top_k must be a whole number, got '5' (str)"),
    (dict(top_k=2.5), "top_k must be a whole number, got 2.5 (float)"),
    (dict(top_k=0), "top_k must be at least 1, got 0"),
    (dict(local_top_k=-1), "local_top_k must be at least 0, got -1"),
    (dict(workers=True), "workers must be a whole number, got True (bool)"),
    (dict(fallback="nearest"), "fallback must be 'knn' or 'global'"),
])
def test_locate_options_of_the_wrong_type_are_named(options, message):
    from delg_geo.core.errors import DelgGeoError
    from delg_geo.retrieval.locate import LocateConfig

    with pytest.raises(DelgGeoError) as e:
        LocateConfig(**options)
    assert isinstance(e.value, ValueError) and message in str(e.value)
    assert LocateConfig(top_k=np.int64(7)).top_k == 7 and type(LocateConfig(top_k=np.int64(7)).top_k) is int


def test_ray_keeps_its_info_and_warning_lines_off_the_terminal(monkeypatch):
    pytest.importorskip("ray")
    from delg_geo.core.ray_pool import ray_log_options

    monkeypatch.delenv("DELG_GEO_RAY_LOGS", raising=False)
    assert ray_log_options() == dict(log_to_driver=False, logging_level=40)
    monkeypatch.setenv("DELG_GEO_RAY_LOGS", "1")
    assert ray_log_options() == dict(log_to_driver=True, logging_level=20)
    code = ("from delg_geo.core.ray_pool import RayOptions, ray_session\n"
            "with ray_session(RayOptions(num_cpus=1), log=lambda m: None) as ray:\n"
            "    print(ray.get(ray.put(41)) + 1)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DELG_GEO_RAY_LOGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    assert "Started a local Ray instance" not in r.stderr and "Token authentication" not in r.stderr, r.stderr
    assert " INFO " not in r.stderr and " WARNING " not in r.stderr, r.stderr


# -- 5. the first minutes ----------------------------------------------------------------------------------

def test_help_describes_every_option_and_the_version(capsys):
    import typer

    from delg_geo import __version__
    from delg_geo.apps.cli import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer's own, not always a click.Group)
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, cmd

    commands = dict((tuple(p), cmd) for p, cmd in walk(typer.main.get_command(app), []))
    missing = [f"{' '.join(p)} {param.opts or param.name}" for p, cmd in commands.items()
               for param in cmd.params if not (getattr(param, "help", None) or "").strip()]
    assert missing == []
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"delg-geo {__version__}"
    for cmd in (("index", "build"), ("index", "add")):
        helps = {p.name: p.help for p in commands[cmd].params}
        assert "An alternative to --from-exif" in helps["metadata"] and "instead of a --metadata file" in helps["from_exif"]
        assert helps["batch_size"].startswith("Images per forward pass") and "JSON" in helps["json_out"]
        code, out, _ = run_cli(capsys, *cmd, "--help")
        assert code == 0 and "alternative to --from-exif" in _flat(out).replace("- -", "--")


def test_the_progress_bar_advances_per_batch_not_per_window(tmp_path, monkeypatch):
    import tqdm

    from _fake_extractor import FakeExtractor, fake_collection
    from delg_geo.features.extract import iter_extract

    images, _ = fake_collection(tmp_path, [f"{k:02d}.jpg" for k in range(12)])
    updates: list[int] = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total = total

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    import threading

    ext = FakeExtractor()
    real = ext.extract_batch
    got_first = threading.Event()
    later_batches_saw_it: list[bool] = []

    def extract_batch(ims):
        # every batch after the first waits for the first answer to reach the caller: were answers
        # held back until the whole window is done, this would wait in vain and record False
        if later_batches_saw_it or getattr(extract_batch, "called", False):
            later_batches_saw_it.append(got_first.wait(timeout=20))
        extract_batch.called = True
        return real(ims)

    ext.extract_batch = extract_batch
    out = []
    for res in iter_extract(sorted(images.iterdir()), ext, batch_size=2, window=32, progress=True, net_workers=1):
        got_first.set()
        out.append(res)
    assert [r.index for r in out] == list(range(12)) and all(r.ok for r in out)
    assert sum(updates) == 12 and max(updates) <= 2 and len(updates) >= 6, updates
    assert later_batches_saw_it and all(later_batches_saw_it), later_batches_saw_it  # answers flow as batches finish


# -- 6. tests that cannot fail, and commands that must not vanish ----------------------------------------------

DOCUMENTED = {("index", c) for c in ("build", "add", "compact", "calibrate", "verify", "info")} | {
    ("query",), ("extract",), ("bench",), ("serve",), ("classifier", "train"),
    ("model", "fetch"), ("model", "add"), ("model", "list")}


def test_every_documented_command_is_in_help(capsys):
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs if p.exists())
    found = {tuple(m.split()) for m in re.findall(
        r"delg-geo ((?:index|model|classifier) [a-z][a-z-]*|query|extract|bench|serve)\b", text)}
    for cmd in sorted(DOCUMENTED | found):
        parent, name = cmd[:-1], cmd[-1]
        code, out, _ = run_cli(capsys, *parent, "--help")
        assert code == 0 and re.search(rf"│ {re.escape(name)}\s", out), (cmd, out)


def test_a_broken_command_module_fails_loudly_instead_of_vanishing():
    for mod in ("delg_geo.apps.cli_bench", "delg_geo.apps.cli_serve"):
        code = f"import sys; sys.modules[{mod!r}] = None\nimport delg_geo.apps.cli\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and mod in r.stderr, (mod, r.stderr)


def test_browser_console_reader_fails_instead_of_passing():
    pytest.importorskip("selenium")
    source = (REPO / "tests" / "test_browser.py").read_text()
    body = source[source.index("def _console_errors"):source.index("def test_upload_shows_marker_and_place")]
    assert "return []" not in body and "pytest.fail(" in body

"""Official DELG SavedModel support: signature check, extraction recipe, fetch/add, CLI.

The real weights cannot be downloaded here, so a tiny SavedModel with exactly the official
serving signature is exported into a temporary folder (see ``_delg_export.py``).
"""

from __future__ import annotations

import json
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from _delg_export import (  # noqa: E402
    GLOBAL_DIM,
    LOCAL_DIM,
    export_tf1_delg,
    export_tiny_delg,
    export_wrong_signature,
)

from delg_geo.core.config import models_dir  # noqa: E402
from delg_geo.core.errors import ModelError  # noqa: E402
from delg_geo.features.images import LoadedImage, load_image  # noqa: E402
from delg_geo.features.models import get_extractor, registry  # noqa: E402
from delg_geo.features.models import fetch  # noqa: E402
from delg_geo.features.models.delg_savedmodel import DelgSavedModelExtractor  # noqa: E402

# A black 800x600 image with a white 128x128 square; the tiny model's attention is brightness.
W, H = 800, 600
SQ_X0, SQ_X1, SQ_Y0, SQ_Y1 = 416, 544, 192, 320


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    good = export_tiny_delg(root / "tiny_delg")
    no_ind = export_tiny_delg(root / "tiny_delg_no_ind", global_scales_input=False)
    bad = export_wrong_signature(root / "wrong")
    tf1 = export_tf1_delg(root / "tf1_delg")
    archive = root / "tiny_delg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(good, arcname="r50delg_test_20200914")  # one top folder, like the official ones
    return {"good": good, "no_ind": no_ind, "bad": bad, "tf1": tf1, "archive": archive}


@pytest.fixture(scope="module")
def square_png(tmp_path_factory):
    a = np.zeros((H, W, 3), np.uint8)
    a[SQ_Y0:SQ_Y1, SQ_X0:SQ_X1] = 255
    p = tmp_path_factory.mktemp("img") / "square.png"
    Image.fromarray(a).save(p)
    return p


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELG_GEO_HOME", str(tmp_path / "home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "home"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind, data = route
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "ok":
            self.wfile.write(data)
        elif kind == "truncated":  # promise len(data) bytes, send half, hang up
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(exported):
    data = exported["archive"].read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes = {
        "/model.tar.gz": ("ok", data),
        "/truncated.tar.gz": ("truncated", data),
        "/corrupt.tar.gz": ("ok", data[: len(data) // 2]),  # honest length, broken gzip
        "/notatar.tar.gz": ("ok", b"<html>not an archive</html>" * 10),
    }
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def _leftovers() -> list[str]:
    root = models_dir()
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_official_values():
    assert set(registry.MODELS) == {
        "delg-r50-gldv1",
        "delg-r101-gldv1",
        "delg-r50-gldv2",
        "delg-r101-gldv2",
    }
    thres = {k: m.abs_thres for k, m in registry.MODELS.items()}
    assert thres == {
        "delg-r50-gldv1": 175.0,
        "delg-r101-gldv1": 166.1,
        "delg-r50-gldv2": 454.6,
        "delg-r101-gldv2": 357.48,
    }
    base = "https://storage.googleapis.com/delf/"
    assert registry.MODELS["delg-r50-gldv1"].url == base + "r50delg_gld_20200814.tar.gz"
    assert registry.MODELS["delg-r101-gldv1"].url == base + "r101delg_gld_20200814.tar.gz"
    assert registry.MODELS["delg-r50-gldv2"].url == base + "r50delg_gldv2clean_20200914.tar.gz"
    assert registry.MODELS["delg-r101-gldv2"].url == base + "r101delg_gldv2clean_20200914.tar.gz"
    assert all(m.global_dim == 2048 and m.local_dim == 128 for m in registry.MODELS.values())
    assert [registry.IMAGE_SCALES[i] for i in registry.GLOBAL_SCALE_IDS] == [0.7071, 1.0, 1.4142]
    assert registry.MAX_FEATURE_NUM == 1000 and registry.MAX_IMAGE_SIZE == 1024


# ---------------------------------------------------------------------------------------------
# (a) signature


def test_check_signature_accepts_official_signature(exported):
    info = fetch.check_signature(exported["good"])
    assert info.has_global_scales_ind
    assert set(fetch.REQUIRED_OUTPUTS) <= set(info.outputs)
    info2 = fetch.check_signature(exported["no_ind"])
    assert not info2.has_global_scales_ind


def test_check_signature_rejects_wrong_signature(exported, tmp_path):
    with pytest.raises(ModelError) as e:
        fetch.check_signature(exported["bad"])
    msg = str(e.value)
    for name in ("input_image", "input_max_feature_num", "input_abs_thres"):
        assert name in msg
    for name in ("features", "scores", "global_descriptors"):
        assert name in msg
    assert "input_scales must be float" in msg
    with pytest.raises(ModelError, match="no saved_model.pb"):
        fetch.check_signature(tmp_path)
    with pytest.raises(ModelError, match="no such"):
        fetch.check_signature(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# (b) extraction


def _assert_in_square(f, tol=8.0):
    kp = f.keypoints
    assert kp.shape[0] > 0
    assert np.all(kp[:, 0] >= SQ_X0 - tol) and np.all(kp[:, 0] <= SQ_X1 + tol), kp[:, 0]
    assert np.all(kp[:, 1] >= SQ_Y0 - tol) and np.all(kp[:, 1] <= SQ_Y1 + tol), kp[:, 1]
    cx, cy = (SQ_X0 + SQ_X1) / 2, (SQ_Y0 + SQ_Y1) / 2
    assert abs(kp[:, 0].mean() - cx) < 6 and abs(kp[:, 1].mean() - cy) < 6


def test_extract_features_and_keypoint_mapping(exported, square_png):
    ex = DelgSavedModelExtractor(exported["good"], abs_thres=600.0, max_side=400)
    assert ex.global_dim == GLOBAL_DIM and ex.local_dim == LOCAL_DIM and ex.max_side == 400
    assert ex.model_id.startswith("delg-savedmodel-") and len(ex.fingerprint) == 64

    # Loaded at half size (400x300): boxes are in those pixels, keypoints must come back x2.
    img = load_image(square_png, max_side=ex.max_side)
    assert img.array.shape[:2] == (300, 400) and img.scale == pytest.approx(0.5)
    f = ex.extract(img)
    assert f.image_size == (W, H) and f.model_id == ex.model_id
    assert f.global_descriptor.dtype == np.float32 and f.global_descriptor.shape == (GLOBAL_DIM,)
    assert np.linalg.norm(f.global_descriptor) == pytest.approx(1.0, abs=1e-5)
    assert f.local_descriptors.dtype == np.float32 and f.local_descriptors.shape[1] == LOCAL_DIM
    np.testing.assert_allclose(np.linalg.norm(f.local_descriptors, axis=1), 1.0, atol=1e-5)
    assert f.keypoints.dtype == np.float32 and f.keypoints.shape == (f.num_local, 2)
    assert f.scores.shape == f.scales.shape == (f.num_local,)
    assert np.all(f.scores >= 600.0)
    assert np.all(np.diff(f.scores) <= 0)  # best first
    # the official "scales" output is 1 / pyramid scale
    inv = 1.0 / np.asarray(registry.IMAGE_SCALES, np.float32)
    assert np.all(np.min(np.abs(f.scales[:, None] - inv[None]), axis=1) < 1e-3)
    _assert_in_square(f)

    # Same picture at full resolution: keypoints in the same (original) place.
    ex_full = DelgSavedModelExtractor(exported["good"], abs_thres=600.0, max_side=1024)
    f_full = ex_full.extract(load_image(square_png, max_side=1024))
    _assert_in_square(f_full)
    assert ex_full.fingerprint == ex.fingerprint

    # Guard: an array larger than max_side is downsized by the extractor, mapping still right.
    big = LoadedImage(np.asarray(Image.open(square_png).convert("RGB")), (W, H))
    f_guard = ex.extract(big)
    _assert_in_square(f_guard)
    np.testing.assert_allclose(f_guard.keypoints.mean(0), f.keypoints.mean(0), atol=1.0)


def test_extract_limits_and_global_scales(exported, square_png):
    img = load_image(square_png, max_side=400)
    many = DelgSavedModelExtractor(exported["good"], abs_thres=0.0, model_id="tiny").extract(img)
    assert many.num_local == registry.MAX_FEATURE_NUM and many.model_id == "tiny"
    assert np.all(many.keypoints >= 0)
    assert np.all(many.keypoints[:, 0] <= W - 1) and np.all(many.keypoints[:, 1] <= H - 1)
    few = DelgSavedModelExtractor(exported["good"], abs_thres=0.0, max_feature_num=50).extract(img)
    assert few.num_local == 50
    none = DelgSavedModelExtractor(exported["good"], abs_thres=5000.0).extract(img)
    assert none.num_local == 0
    assert none.keypoints.shape == (0, 2) and none.local_descriptors.shape == (0, LOCAL_DIM)
    assert np.linalg.norm(none.global_descriptor) == pytest.approx(1.0, abs=1e-5)

    # A model without input_global_scales_ind returns one descriptor per scale: the extractor
    # must keep scales 3, 4, 5 itself and get the same global descriptor (same weights).
    g_ind = DelgSavedModelExtractor(exported["good"], abs_thres=600.0).extract(img)
    g_all = DelgSavedModelExtractor(exported["no_ind"], abs_thres=600.0).extract(img)
    np.testing.assert_allclose(g_ind.global_descriptor, g_all.global_descriptor, atol=1e-5)
    # ... and the global descriptor really depends on which scales are used.
    other = DelgSavedModelExtractor(exported["good"], global_scale_ids=(0, 1)).extract(img)
    assert not np.allclose(other.global_descriptor, g_ind.global_descriptor, atol=1e-3)

    # Tiny images are upscaled to at least 10 pixels instead of failing.
    tiny = LoadedImage(np.full((4, 6, 3), 200, np.uint8), (6, 4))
    ft = DelgSavedModelExtractor(exported["good"], abs_thres=0.0).extract(tiny)
    assert ft.image_size == (6, 4)
    assert np.all(ft.keypoints[:, 0] <= 5) and np.all(ft.keypoints[:, 1] <= 3)


def test_tf1_style_savedmodel_exact_mapping(exported, square_png):
    """A TF1 SignatureDef export works too; one whole-image box -> keypoint at the exact centre."""
    info = fetch.check_signature(exported["tf1"])
    assert info.has_global_scales_ind
    ex = DelgSavedModelExtractor(exported["tf1"], abs_thres=3.0, max_side=400)
    assert ex.global_dim == 8 and ex.local_dim == 4
    img = load_image(square_png, max_side=400)  # 400x300 fed, 800x600 original
    f = ex.extract(img)
    assert f.num_local == 1
    # box [0, 0, 299, 399] in fed pixels -> centre (x=199.5, y=149.5) -> original x2
    np.testing.assert_allclose(f.keypoints, [[399.0, 299.0]], atol=1e-4)
    assert f.scores[0] == pytest.approx(4.0)  # the abs_thres given was fed
    # global: rows k + [0..7] + sum(scales) for k in (3, 4, 5); per-row L2, sum, L2
    base = np.arange(8, dtype=np.float32) + np.float32(sum(registry.IMAGE_SCALES))
    rows = np.stack([base + k for k in registry.GLOBAL_SCALE_IDS])
    want = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    want = want.sum(0) / np.linalg.norm(want.sum(0))
    np.testing.assert_allclose(f.global_descriptor, want, atol=1e-5)
    # a non-uniform downscale (odd sizes) is mapped back per axis
    odd = LoadedImage(np.zeros((101, 301, 3), np.uint8), (903, 300))
    fo = ex.extract(odd)
    np.testing.assert_allclose(fo.keypoints, [[150.0 * 903 / 301, 50.0 * 300 / 101]], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# (c) fetch over HTTP, (d) interrupted downloads


def test_fetch_model_over_http(home, server, exported, square_png):
    path = fetch.fetch_model("delg-r50-gldv2", url=server + "/model.tar.gz", progress=False)
    assert path == fetch.model_path("delg-r50-gldv2") == home / "models" / "delg-r50-gldv2"
    assert (path / "saved_model.pb").is_file() and fetch.is_installed("delg-r50-gldv2")
    assert _leftovers() == ["delg-r50-gldv2"]  # no temporaries left behind

    ex = get_extractor("delg-r50-gldv2")
    assert isinstance(ex, DelgSavedModelExtractor)
    assert ex.model_id == "delg-r50-gldv2" and ex.abs_thres == 454.6
    f = ex.extract(load_image(square_png, max_side=ex.max_side))
    assert f.model_id == "delg-r50-gldv2" and f.num_local > 0

    # Fetching again replaces the install in place.
    again = fetch.fetch_model("delg-r50-gldv2", url=server + "/model.tar.gz", progress=False)
    assert again == path and fetch.is_installed("delg-r50-gldv2")
    assert _leftovers() == ["delg-r50-gldv2"]


@pytest.mark.parametrize(
    "route, match",
    [
        ("/truncated.tar.gz", "interrupted"),
        ("/corrupt.tar.gz", "corrupt or truncated"),
        ("/notatar.tar.gz", "corrupt or truncated"),
        ("/missing.tar.gz", "HTTP 404"),
    ],
)
def test_failed_fetch_leaves_nothing(home, server, route, match):
    with pytest.raises(ModelError, match=match):
        fetch.fetch_model("delg-r50-gldv1", url=server + route, progress=False)
    assert not fetch.model_path("delg-r50-gldv1").exists()
    assert not fetch.is_installed("delg-r50-gldv1")
    assert _leftovers() == []


def test_failed_fetch_keeps_previous_install(home, server, exported):
    fetch.add_model("delg-r50-gldv1", exported["good"])
    before = (fetch.model_path("delg-r50-gldv1") / "saved_model.pb").read_bytes()
    with pytest.raises(ModelError, match="interrupted"):
        fetch.fetch_model("delg-r50-gldv1", url=server + "/truncated.tar.gz", progress=False)
    assert (fetch.model_path("delg-r50-gldv1") / "saved_model.pb").read_bytes() == before
    assert _leftovers() == ["delg-r50-gldv1"]


def test_interrupted_process_cleans_up(home, server, monkeypatch):
    real = fetch._download

    def broken(url, fh, name, progress, **kw):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_download", broken)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_model("delg-r50-gldv1", url=server + "/model.tar.gz", progress=False)
    assert _leftovers() == []
    monkeypatch.setattr(fetch, "_download", real)


def test_fetch_unreachable_says_offline(home):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ModelError) as e:
        fetch.fetch_model("delg-r101-gldv2", url=f"http://127.0.0.1:{port}/x.tar.gz", progress=False)
    msg = str(e.value)
    assert "offline" in msg and "delg-geo model add delg-r101-gldv2 PATH" in msg
    assert _leftovers() == []


def test_fetch_unknown_name_without_url(home):
    with pytest.raises(ModelError, match="unknown model"):
        fetch.fetch_model("my-model", progress=False)
    with pytest.raises(ModelError, match="invalid model name"):
        fetch.model_path("../evil")


# ---------------------------------------------------------------------------------------------
# (e) add_model


def test_add_model_from_folder_and_archive(home, exported):
    p1 = fetch.add_model("delg-r50-gldv1", exported["good"])
    assert (p1 / "saved_model.pb").is_file() and (p1 / "variables").is_dir()
    assert (exported["good"] / "saved_model.pb").is_file()  # source untouched (copied)
    p2 = fetch.add_model("delg-r101-gldv1", exported["archive"])
    assert (p2 / "saved_model.pb").is_file()
    # Re-adding replaces.
    assert fetch.add_model("delg-r50-gldv1", exported["archive"]) == p1
    assert _leftovers() == ["delg-r101-gldv1", "delg-r50-gldv1"]
    a = DelgSavedModelExtractor.from_registry("delg-r50-gldv1")
    b = DelgSavedModelExtractor.from_registry("delg-r101-gldv1")
    assert a.fingerprint == b.fingerprint  # same weights, however they were added
    assert a.abs_thres == 175.0 and b.abs_thres == 166.1


def test_add_model_rejects_bad_input(home, exported, tmp_path):
    with pytest.raises(ModelError, match="global_descriptors"):
        fetch.add_model("delg-r50-gldv2", exported["bad"])
    with pytest.raises(ModelError, match="no such"):
        fetch.add_model("delg-r50-gldv2", tmp_path / "absent")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ModelError, match="neither"):
        fetch.add_model("delg-r50-gldv2", junk)
    assert not fetch.is_installed("delg-r50-gldv2")
    assert _leftovers() == []


# ---------------------------------------------------------------------------------------------
# (f) missing models


def test_missing_registry_model_says_what_to_run(home):
    with pytest.raises(ModelError) as e:
        get_extractor("delg-r50-gldv2")
    msg = str(e.value)
    assert "delg-geo model fetch delg-r50-gldv2" in msg
    assert "delg-geo model add delg-r50-gldv2 PATH" in msg


def test_get_extractor_from_folder(exported):
    ex = get_extractor(str(exported["good"]), abs_thres=600.0)
    assert isinstance(ex, DelgSavedModelExtractor) and ex.abs_thres == 600.0


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_model(home, exported):
    from typer.testing import CliRunner

    from delg_geo.apps.cli_model import app

    runner = CliRunner()
    r = runner.invoke(app, ["list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    official = {k: v for k, v in rows.items() if k in registry.MODELS}
    assert set(official) == set(registry.MODELS) and not any(r_["installed"] for r_ in official.values())
    assert set(rows) - set(official) == {"xfeat", "aliked-n16"}  # the learned local-feature weights

    r = runner.invoke(app, ["add", "delg-r50-gldv2", str(exported["archive"])])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["list", "--json"])
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["delg-r50-gldv2"]["installed"] and not rows["delg-r50-gldv1"]["installed"]
    assert rows["delg-r50-gldv2"]["path"] == str(home / "models" / "delg-r50-gldv2")
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and "delg-r50-gldv2" in r.stdout

    r = runner.invoke(app, ["add", "delg-r50-gldv1", str(exported["bad"])])
    assert r.exit_code == 2
    r = runner.invoke(app, ["fetch", "no-such-model"])
    assert r.exit_code == 2

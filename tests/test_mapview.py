"""Self-contained HTML maps (mapview) and the match picture (explain)."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("xstatic.pkg.leaflet", reason="XStatic-Leaflet is a dependency of delg-geo: pip install -e .")

from _tiny_index import tiny_geo  # noqa: E402,F401  (session fixture)
from delg_geo.evaluation import mapview  # noqa: E402
from delg_geo.apps.explain import draw_explain, explain_prediction  # noqa: E402

CDN = re.compile(r"<(script|link|img)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", re.I)


def _json_block(html: str, elem_id: str):
    m = re.search(rf'<script id="{elem_id}" type="application/json">(.*?)</script>', html, re.S)
    assert m, f"no {elem_id} block"
    return json.loads(m.group(1))


def _assert_self_contained(html: str):
    assert not CDN.search(html), CDN.search(html).group(0)
    assert "<script src" not in html.replace(" ", "")  # every script is inline
    # Leaflet's own code is inlined from the installed package
    js = mapview.leaflet_js()
    assert len(js) > 100_000 and js[2000:2200] in html
    assert "url(images/" not in html  # its CSS images are data URIs
    world = _json_block(html, "dg-world")
    assert world["type"] == "FeatureCollection" and len(world["features"]) > 150


def test_leaflet_assets_come_from_the_installed_package():
    from xstatic.pkg import leaflet

    assert mapview.leaflet_version() == leaflet.VERSION
    js, css = mapview.leaflet_js(), mapview.leaflet_css()
    assert "Leaflet" in js[:300] and "</script" not in js.lower()
    assert ".leaflet-container" in css and "data:image/png;base64," in css


def test_world_outline_is_small_and_covers_the_world():
    text = mapview.world_outline_geojson()
    assert len(text) < 300_000
    world = json.loads(text)
    lons = [p[0] for f in world["features"] for poly in f["geometry"]["coordinates"] for ring in poly for p in ring]
    lats = [p[1] for f in world["features"] for poly in f["geometry"]["coordinates"] for ring in poly for p in ring]
    assert min(lons) <= -179 and max(lons) >= 179 and min(lats) < -80 and max(lats) > 80
    # Venice's lagoon coast: some outline point within ~1 degree of Venice
    assert any(abs(a - 45.44) < 1 and abs(b - 12.33) < 1 for a, b in zip(lats, lons))


def test_bench_map(tmp_path):
    rows = [
        {"img_id": "a.jpg", "gt_lat": 45.4381, "gt_lon": 12.3358, "pred_lat": 45.4390, "pred_lon": 12.3360, "error_km": 0.1},
        {"img_id": "b.jpg", "gt_lat": 48.8584, "gt_lon": 2.2945, "pred_lat": 40.6892, "pred_lon": -74.0445, "error_km": 5837.0},
        {"img_id": "c.jpg", "gt_lat": -17.7, "gt_lon": 178.0, "pred_lat": -14.3, "pred_lon": -170.7, "error_km": 1100.0},
        {"img_id": "nan.jpg", "gt_lat": float("nan"), "gt_lon": 0, "pred_lat": 0, "pred_lon": 0, "error_km": float("nan")},
        {"img_id": "</script><b>x", "gt_lat": 1, "gt_lon": 2, "pred_lat": 1, "pred_lon": 2.5, "error_km": 55.6},
    ]
    out = mapview.write_bench_map(rows, tmp_path / "bench.html")
    html = out.read_text()
    _assert_self_contained(html)
    data = _json_block(html, "dg-data")
    assert [r["img_id"] for r in data["rows"]] == ["a.jpg", "b.jpg", "c.jpg", "</script><b>x"]  # the NaN row left out
    assert data["rows"][0]["colour"] == mapview.error_colour(0.1) != data["rows"][1]["colour"]
    assert "45.439" in html and "-74.0445" in html
    assert "L.polyline" in html
    # the same from a DataFrame
    import pandas as pd

    html2 = mapview.bench_map_html(pd.DataFrame(rows))
    assert len(_json_block(html2, "dg-data")["rows"]) == 4


def test_prediction_map(tiny_geo, tmp_path):
    geo, ref, venice = tiny_geo
    preds = [geo.locate(venice / ref.image[i]) for i in (0, 5)]
    out = mapview.write_prediction_map(preds, geo.index, tmp_path / "map.html", title="Two photos")
    html = out.read_text()
    _assert_self_contained(html)
    assert "<title>Two photos</title>" in html
    data = _json_block(html, "dg-data")
    assert len(data["predictions"]) == 2
    for p, d in zip(preds, data["predictions"]):
        assert math.isclose(d["lat"], p.lat) and math.isclose(d["lon"], p.lon)
        assert f"{p.lat:.6f}, {p.lon:.6f}" in html
        assert d["neighbour"]["id"] == p.neighbour.id
        assert d["neighbour"]["thumb"].startswith("data:image/jpeg;base64,")
        assert len(d["alternatives"]) == len(p.alternatives) > 0
        assert all(a["thumb"] and a["thumb"].startswith("data:image/jpeg;base64,") for a in d["alternatives"])
        assert "IT" in d["place"]
    thumb = data["predictions"][0]["neighbour"]["thumb"].split(",", 1)[1]
    im = Image.open(io.BytesIO(base64.b64decode(thumb)))
    assert im.format == "JPEG" and max(im.size) <= 160
    assert len(html) < 3_000_000


def test_draw_explain_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(a).save(pa)
    Image.fromarray(a[:, ::-1]).resize((800, 600)).save(pb)  # mirrored, twice the size
    kq = np.array([[10, 20], [200, 150], [390, 290]], np.float32)
    kn = np.array([[(400 - x) * 2, y * 2] for x, y in kq], np.float32)
    out = draw_explain(pa, pb, kq, kn, np.array([[0, 0], [1, 1], [2, 2], [5, 9]]), tmp_path / "m.png")
    im = Image.open(out)
    assert im.format == "PNG"
    from delg_geo.apps.explain import HEADER

    assert HEADER >= 40  # two lines: the photos' labels, then what the answer is
    assert im.height == 480 + HEADER and im.width == 640 + 12 + 640


def test_explain_prediction(tiny_geo, tmp_path):
    geo, ref, venice = tiny_geo
    photo = venice / ref.image[4]
    pred = geo.locate(photo)
    v = explain_prediction(geo, photo, pred, tmp_path / "why.png")
    assert v.inliers >= geo.config.verify_config.min_inliers
    assert v.inlier_pairs.shape == (v.inliers, 2)
    im = Image.open(tmp_path / "why.png")
    assert im.format == "PNG" and im.width > im.height
    # also from the prediction's dict
    explain_prediction(geo, photo, pred.to_dict(), tmp_path / "why2.png")
    assert (tmp_path / "why2.png").stat().st_size > 10_000

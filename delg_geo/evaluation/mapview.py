"""See it on a map: self-contained HTML maps of predictions and of benchmark errors.

The HTML files work offline and from ``file://``: Leaflet's code and CSS are inlined from the
installed PyPI package ``XStatic-Leaflet`` (read at run time, nothing is fetched from a CDN), the
reference photos are embedded as small base64 JPEG thumbnails, and a bundled Natural Earth
1:110m world outline (:mod:`delg_geo.evaluation._world_outline`) lies under the OpenStreetMap tiles, so the
map is never blank when the tiles cannot load.

* :func:`write_prediction_map` — the predicted point, the verified neighbour and the
  alternatives, each with a popup showing the reference photo.
* :func:`write_bench_map` — every benchmark query's true and predicted position joined by a line
  coloured by the error.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

from delg_geo.core.jsonio import dumps as json_dumps

#: Error bands (km) of the usual geolocation accuracy levels, with the colours of the bench map.
ERROR_BANDS: tuple[tuple[float, str, str], ...] = (
    (1.0, "#1a9850", "street (< 1 km)"),
    (25.0, "#91cf60", "city (< 25 km)"),
    (200.0, "#fee08b", "region (< 200 km)"),
    (750.0, "#fc8d59", "country (< 750 km)"),
    (2500.0, "#d73027", "continent (< 2500 km)"),
    (math.inf, "#7f0000", "farther"),
)

OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
OSM_ATTRIBUTION = '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'

# A transparent 1x1 GIF for tiles that fail to load (no broken-image boxes offline).
_BLANK_GIF = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


# -- assets from installed packages -------------------------------------------------------------

def _leaflet_dir() -> Path:
    try:
        from xstatic.pkg import leaflet
    except ImportError as e:  # pragma: no cover - a dependency of delg-geo
        raise ImportError("the HTML maps need the PyPI package XStatic-Leaflet: pip install XStatic-Leaflet") from e
    return Path(leaflet.BASE_DIR)


@functools.lru_cache(maxsize=1)
def leaflet_version() -> str:
    from xstatic.pkg import leaflet

    return str(leaflet.VERSION)


@functools.lru_cache(maxsize=1)
def leaflet_js() -> str:
    """Leaflet's minified code from the installed package, safe to inline in a ``<script>``."""
    text = (_leaflet_dir() / "leaflet.js").read_text(encoding="utf-8")
    text = re.sub(r"//# sourceMappingURL=\S+\s*$", "", text)
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.I)


@functools.lru_cache(maxsize=1)
def leaflet_css() -> str:
    """Leaflet's CSS with its images (layer-control and marker icons) inlined as data URIs."""
    d = _leaflet_dir()
    css = (d / "leaflet.css").read_text(encoding="utf-8")

    def inline(m: re.Match) -> str:
        p = d / m.group(1)
        if not p.is_file():
            return m.group(0)
        return "url(data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() + ")"

    return re.sub(r"url\((images/[\w.-]+\.png)\)", inline, css)


def world_outline_geojson() -> str:
    """The bundled Natural Earth 1:110m country outlines as a GeoJSON string."""
    from delg_geo.evaluation._world_outline import GEOJSON

    return GEOJSON


# -- thumbnails ----------------------------------------------------------------------------------

def thumbnail_jpeg(source: str | Path | bytes, size: int = 160, quality: int = 80) -> bytes:
    """A JPEG whose longest side is at most ``size`` px (EXIF orientation applied)."""
    from PIL import Image

    from delg_geo.features.images import load_image

    img = load_image(source, max_side=size)
    buf = io.BytesIO()
    Image.fromarray(img.array).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def thumbnail_data_uri(source: str | Path | bytes, size: int = 160) -> str | None:
    """``data:image/jpeg;base64,...`` of a thumbnail, or None when the image cannot be read."""
    from delg_geo.core.errors import ImageLoadError

    try:
        return "data:image/jpeg;base64," + base64.b64encode(thumbnail_jpeg(source, size)).decode()
    except (ImageLoadError, OSError, ValueError):
        return None


def _allowed_roots(index) -> list[tuple[str, bool]]:
    """(real images folder, allow_outside) of every batch of images the index was built from."""
    manifest = getattr(index, "manifest", None)
    out = []
    for src in getattr(manifest, "sources", None) or []:
        if isinstance(src, dict) and src.get("images_dir"):
            out.append((os.path.realpath(str(src["images_dir"])), bool(src.get("allow_outside"))))
    return out


def reference_path(index, i: int) -> Path | None:
    """Where the reference photo of index row ``i`` is on disk, if it still is.

    The real path (every symlink resolved) must lie inside an images folder the index was built
    from, unless that build allowed paths outside it (``--allow-outside``): a symlink placed or
    swapped in later cannot make the server hand out other files.
    """
    row = index.table.row(i)
    cands = []
    if row.get("path"):
        cands.append(row["path"])
    if row.get("image"):
        cands.append(Path(index.path) / row["image"])
    roots = _allowed_roots(index)
    for c in cands:
        if not (isinstance(c, (str, Path)) and str(c) and Path(c).is_file()):
            continue
        real = os.path.realpath(c)
        if any(allow or os.path.commonpath([root, real]) == root for root, allow in roots):
            return Path(real)
    return None


# -- HTML ------------------------------------------------------------------------------------------

def _json_for_html(obj: Any) -> str:
    """JSON that can sit inside ``<script type="application/json">``."""
    return json_dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def _asset(name: str) -> str:
    return (Path(__file__).resolve().parent / "assets" / name).read_text(encoding="utf-8")


#: Page-independent map code (``assets/base-map.js``): ``dgBaseMap(elementId, worldGeoJSON)`` -> a
#: Leaflet map with the OpenStreetMap tiles over the bundled outline, and a note when the tiles do
#: not load.
BASE_MAP_JS = (_asset("base-map.js").replace("{{tiles}}", json.dumps(OSM_TILES))
               .replace("{{attribution}}", json.dumps(OSM_ATTRIBUTION)).replace("{{blank}}", json.dumps(_BLANK_GIF)))

#: The style every map shares (``assets/base.css``).
BASE_CSS = _asset("base.css")


def _page(title: str, head_extra: str, body: str, scripts: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n"
        f"<!-- Leaflet {leaflet_version()} (BSD-2-Clause, leafletjs.com), inlined from the PyPI package XStatic-Leaflet -->\n"
        f"<style>\n{leaflet_css()}\n</style>\n<style>{BASE_CSS}{head_extra}</style>\n</head>\n<body>\n{body}\n"
        f"<script>\n{leaflet_js()}\n</script>\n"
        f"<script id=\"dg-world\" type=\"application/json\">{world_outline_geojson()}</script>\n"
        f"<script>{BASE_MAP_JS}</script>\n{scripts}\n</body>\n</html>\n"
    )


def _as_dict(p) -> dict:
    if isinstance(p, dict):
        return dict(p)
    if hasattr(p, "to_dict"):
        return p.to_dict()
    raise TypeError(f"expected a Prediction or its dict, got {type(p).__name__}")


# -- prediction map ----------------------------------------------------------------------------------

_PRED_CSS = """
body { display: flex; }
#dg-panel { width: 320px; overflow-y: auto; padding: 12px 14px; box-sizing: border-box; border-right: 1px solid #ddd; background: #fafafa; }
#dg-map { flex: 1; height: 100%; }
#dg-panel h1 { font-size: 17px; margin: 0 0 8px; }
.dg-q { border-top: 1px solid #e3e3e3; padding: 8px 0; cursor: pointer; }
.dg-q img { max-width: 100%; max-height: 180px; display: block; margin: 4px 0; border-radius: 3px; }
.dg-q .dg-place { font-weight: 600; }
.dg-small { color: #666; font-size: 12px; }
@media (max-width: 700px) { body { flex-direction: column; } #dg-panel { width: 100%; max-height: 40%; } }
"""

_PRED_JS = """
<script>
(function () {
  var data = JSON.parse(document.getElementById('dg-data').textContent);
  var world = JSON.parse(document.getElementById('dg-world').textContent);
  var map = dgBaseMap('dg-map', world);
  var all = [], groups = [];
  function popup(title, r, extra) {
    var h = '<div class="dg-popup"><b>' + dgEsc(title) + '</b>';
    if (r.thumb) h += '<img alt="reference photo" src="' + r.thumb + '">';
    else h += '<div class="dg-small">(photo not available)</div>';
    h += '<div class="dg-small">' + dgEsc(r.image) + '</div>';
    if (r.place) h += '<div>' + dgEsc(r.place) + '</div>';
    h += '<div class="dg-small">' + r.lat.toFixed(6) + ', ' + r.lon.toFixed(6) + '</div>';
    if (extra) h += '<div class="dg-small">' + extra + '</div>';
    return h + '</div>';
  }
  data.predictions.forEach(function (p, k) {
    var g = L.featureGroup().addTo(map), pts = [[p.lat, p.lon]];
    p.alternatives.forEach(function (a, j) {
      L.marker([a.lat, a.lon], {icon: dgPin('alt', 'alternative ' + (j + 1)), zIndexOffset: 0})
        .bindPopup(popup('Alternative ' + (j + 1) + ' (score ' + a.score.toFixed(2) + ')', a,
                         a.inliers + ' inliers, similarity ' + a.similarity.toFixed(3) + ', ' + a.distance_km.toFixed(2) + ' km away'))
        .addTo(g);
      pts.push([a.lat, a.lon]);
    });
    var n = p.neighbour;
    if (Math.abs(n.lat - p.lat) > 1e-9 || Math.abs(n.lon - p.lon) > 1e-9) {
      L.marker([n.lat, n.lon], {icon: dgPin('neighbour', 'verified neighbour'), zIndexOffset: 500})
        .bindPopup(popup('Verified neighbour', n, n.inliers + ' inliers, similarity ' + n.similarity.toFixed(3))).addTo(g);
      pts.push([n.lat, n.lon]);
    }
    var m = L.marker([p.lat, p.lon], {icon: dgPin('pred', 'predicted location'), zIndexOffset: 1000})
      .bindPopup(popup('Predicted: ' + (p.place || ''), {thumb: n.thumb, image: 'neighbour ' + n.image, lat: p.lat, lon: p.lon},
                       dgEsc(p.method) + ', ' + dgEsc(p.confidence_text) + ', ' + p.inliers + ' inliers'))
      .addTo(g);
    all = all.concat(pts);
    groups.push({group: g, marker: m, pts: pts});
  });
  if (all.length === 1) map.setView(all[0], 16);
  else if (all.length) map.fitBounds(L.latLngBounds(all).pad(0.15), {maxZoom: 17});
  else map.setView([20, 0], 2);
  document.querySelectorAll('.dg-q').forEach(function (el) {
    el.addEventListener('click', function () {
      var g = groups[+el.dataset.k];
      if (g.pts.length > 1) map.fitBounds(L.latLngBounds(g.pts).pad(0.2), {maxZoom: 17}); else map.setView(g.pts[0], 16);
      g.marker.openPopup();
    });
  });
  if (groups.length === 1) groups[0].marker.openPopup();
})();
</script>
"""


def prediction_map_html(predictions: Iterable, index, title: str | None = None, thumb_size: int = 160,
                        query_thumbs: bool = True) -> str:
    """The HTML of :func:`write_prediction_map` as a string."""
    from delg_geo.core.places import add_places

    preds = [_as_dict(p) for p in predictions]
    thumbs: dict[int, str | None] = {}

    def thumb(i: int) -> str | None:
        if i not in thumbs:
            p = reference_path(index, i)
            thumbs[i] = thumbnail_data_uri(p, thumb_size) if p else None
        return thumbs[i]

    def label(pl: dict | None) -> str:
        if not pl:
            return ""
        return ", ".join(str(x) for x in (pl.get("name"), pl.get("admin1"), pl.get("country_code")) if x)

    out = []
    panel = []
    for k, d in enumerate(preds):
        if not d.get("place"):
            try:
                add_places(d)
            except Exception:  # noqa: BLE001 - a map without place names is still a map
                pass
        n = dict(d["neighbour"])
        n["thumb"] = thumb(int(n["id"]))
        n["place"] = label(d.get("place"))
        alts = []
        for a in d.get("alternatives") or []:
            a = dict(a)
            a["thumb"] = thumb(int(a["id"]))
            a["place"] = label(a.get("place"))
            alts.append(a)
        rec = {
            "image": str(d.get("image", "")), "lat": float(d["lat"]), "lon": float(d["lon"]),
            "method": d.get("method", ""), "confidence": float(d.get("confidence", 0.0)),
            "confidence_text": str(d.get("confidence_text") or f"confidence {100 * float(d.get('confidence', 0.0)):.0f}%"),
            "inliers": int(d.get("inliers", 0)), "place": label(d.get("place")), "neighbour": n,
            "alternatives": alts, "note": d.get("note", ""),
        }
        out.append(rec)
        q_img = ""
        if query_thumbs and rec["image"] and Path(rec["image"]).is_file():
            uri = thumbnail_data_uri(rec["image"], 240)
            if uri:
                q_img = f'<img alt="query photo" src="{uri}">'
        panel.append(
            f'<div class="dg-q" data-k="{k}"><div class="dg-small">{html.escape(Path(rec["image"]).name or rec["image"])}</div>'
            f"{q_img}<div class=\"dg-place\">{html.escape(rec['place'] or 'unknown place')}</div>"
            f"<div>{rec['lat']:.6f}, {rec['lon']:.6f}</div>"
            f"<div class=\"dg-small\">{html.escape(rec['method'])}, {html.escape(rec['confidence_text'])}, "
            f"{rec['inliers']} inliers{(' — ' + html.escape(rec['note'])) if rec['note'] else ''}</div></div>"
        )
    title = title or ("Where was this photo taken?" if len(out) == 1 else f"{len(out)} located photos")
    sw = '<span class="dg-pin dg-%s" style="display:inline-block;vertical-align:middle;margin-right:6px"></span>'
    any_apart = any(abs(r["neighbour"]["lat"] - r["lat"]) > 1e-9 or abs(r["neighbour"]["lon"] - r["lon"]) > 1e-9 for r in out)
    legend = (
        '<div class="dg-small" style="margin:6px 0 8px;line-height:2">'
        + sw % "pred" + ("predicted location" if any_apart else "predicted location (the verified neighbour's photo)") + "<br>"
        + ((sw % "neighbour") + "verified neighbour<br>" if any_apart else "")
        + sw % "alt" + "alternatives (other places among the top matches)</div>"
    )
    body = (
        f'<div id="dg-panel"><h1>{html.escape(title)}</h1>{legend}{"".join(panel)}</div><div id="dg-map"></div>\n'
        f'<script id="dg-data" type="application/json">{_json_for_html({"predictions": out})}</script>'
    )
    return _page(title, _PRED_CSS, body, _PRED_JS)


def write_prediction_map(predictions: list, index, path: str | Path, title: str | None = None) -> Path:
    """Write ONE self-contained HTML map of ``predictions`` (``Prediction`` objects or their dicts).

    Each prediction shows its predicted point, the verified neighbour and the alternatives; each
    marker's popup has a thumbnail of the reference photo (read from ``index.metadata.path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prediction_map_html(predictions, index, title), encoding="utf-8")
    return path


# -- bench map ----------------------------------------------------------------------------------------

def error_colour(km: float) -> str:
    for limit, colour, _ in ERROR_BANDS:
        if km < limit:
            return colour
    return ERROR_BANDS[-1][1]


_BENCH_CSS = """
#dg-map { position: absolute; inset: 0; }
.dg-title { background: rgba(255,255,255,.92); padding: 6px 10px; border-radius: 4px; font-size: 14px; }
"""

_BENCH_JS = """
<script>
(function () {
  var data = JSON.parse(document.getElementById('dg-data').textContent);
  var world = JSON.parse(document.getElementById('dg-world').textContent);
  var map = dgBaseMap('dg-map', world, {preferCanvas: true});
  var pts = [];
  data.rows.forEach(function (r) {
    var plon = r.pred_lon;  // draw the short way round across the antimeridian
    if (plon - r.gt_lon > 180) plon -= 360; else if (r.gt_lon - plon > 180) plon += 360;
    var tip = '<b>' + dgEsc(r.img_id) + '</b><br>error ' + (r.error_km < 1 ? (1000 * r.error_km).toFixed(0) + ' m' : r.error_km.toFixed(1) + ' km') +
              '<br>true ' + r.gt_lat.toFixed(5) + ', ' + r.gt_lon.toFixed(5) + '<br>predicted ' + r.pred_lat.toFixed(5) + ', ' + r.pred_lon.toFixed(5);
    L.polyline([[r.gt_lat, r.gt_lon], [r.pred_lat, plon]], {color: r.colour, weight: 2, opacity: 0.8}).bindPopup(tip).addTo(map);
    L.circleMarker([r.gt_lat, r.gt_lon], {radius: 3, color: '#1f4e9c', weight: 1, fillColor: '#3b7dd8', fillOpacity: 0.9}).bindPopup(tip).addTo(map);
    L.circleMarker([r.pred_lat, plon], {radius: 4, color: '#333', weight: 1, fillColor: r.colour, fillOpacity: 0.95}).bindPopup(tip).addTo(map);
    pts.push([r.gt_lat, r.gt_lon]); pts.push([r.pred_lat, plon]);
  });
  if (pts.length) map.fitBounds(L.latLngBounds(pts).pad(0.05), {maxZoom: 17}); else map.setView([20, 0], 2);
  var legend = L.control({position: 'bottomright'});
  legend.onAdd = function () {
    var d = L.DomUtil.create('div', 'dg-legend');
    var h = '<b>error</b><br><i style="background:#3b7dd8"></i>true position<br>';
    data.bands.forEach(function (b) { h += '<i style="background:' + b[1] + '"></i>' + dgEsc(b[2]) + ' (' + b[3] + ')<br>'; });
    d.innerHTML = h; return d;
  };
  legend.addTo(map);
  var t = L.control({position: 'topright'});
  t.onAdd = function () { var d = L.DomUtil.create('div', 'dg-title'); d.textContent = data.title; return d; };
  t.addTo(map);
})();
</script>
"""


def _bench_rows(rows) -> list[dict]:
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    out = []
    for r in rows:
        r = r if isinstance(r, dict) else (r._asdict() if hasattr(r, "_asdict") else vars(r))
        try:
            rec = {k: float(r[k]) for k in ("gt_lat", "gt_lon", "pred_lat", "pred_lon", "error_km")}
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in rec.values()):
            continue
        rec["img_id"] = str(r.get("img_id", r.get("image", "")))
        rec["colour"] = error_colour(rec["error_km"])
        out.append(rec)
    return out


def bench_map_html(rows, title: str | None = None) -> str:
    recs = _bench_rows(rows)
    errs = sorted(r["error_km"] for r in recs)
    med = errs[len(errs) // 2] if errs else float("nan")
    title = title or f"{len(recs)} queries: true (blue) vs predicted, median error {med:.3g} km"
    bands = [[lim if math.isfinite(lim) else None, col, name, sum(1 for r in recs if r["colour"] == col)]
             for lim, col, name in ERROR_BANDS]
    body = (
        '<div id="dg-map"></div>\n'
        f'<script id="dg-data" type="application/json">{_json_for_html({"rows": recs, "bands": bands, "title": title})}</script>'
    )
    return _page(title, _BENCH_CSS, body, _BENCH_JS)


def write_bench_map(rows, path: str | Path, title: str | None = None) -> Path:
    """Write a self-contained HTML map of benchmark results.

    ``rows``: dicts (or a DataFrame) with ``gt_lat, gt_lon, pred_lat, pred_lon, error_km, img_id``.
    Each query's true position and prediction are joined by a line coloured by the error band
    (street / city / region / country / continent); rows with missing values are left out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bench_map_html(rows, title), encoding="utf-8")
    return path

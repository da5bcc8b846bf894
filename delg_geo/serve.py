"""``delg-geo serve``: a small web app to drop a photo in and see where it was taken.

:func:`create_app` builds a FastAPI app around one shared, already loaded :class:`Geolocator`:

* ``GET /`` — the page: upload or drag in a photo, see the predicted place on a Leaflet map with
  its name and confidence, the top matches with thumbnails, and the match picture. Leaflet is
  served from the installed PyPI package XStatic-Leaflet (no CDN); a bundled world outline keeps
  the map usable when the OpenStreetMap tiles cannot load.
* ``POST /api/locate`` — multipart field ``file``; answers ``Prediction.to_dict()`` (what
  ``delg-geo query --json`` prints) plus ``place``. The header ``X-Match-Image`` gives the URL of
  the match picture. 400: empty upload; 413: larger than the limit; 415: not a readable image.
* ``GET /api/thumb/{id}`` — a JPEG thumbnail of reference photo ``id``.
* ``GET /api/match/{token}.png`` — the query beside its verified neighbour, inliers drawn.
* ``GET /api/info``, ``GET /healthz``, ``GET /openapi.json``.

Requests run in the server's thread pool; at most ``max_concurrent`` locate at once (each one
gets its own features and answer; the Geolocator holds no per-request state) and at most
``max_queue`` more wait for their turn: beyond that the answer is 503 with ``Retry-After`` (the
seconds the queue ahead should take), never an unbounded wait. Memory stays bounded: uploads are
decoded straight to the model's working size (``max_side``), the match pictures kept for recent
queries are small JPEGs, and freed memory is handed back to the system after each request
(:func:`bound_memory`).
"""

import collections
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DelgGeoError, ImageLoadError
from .jsonio import json_default

DEFAULT_MAX_UPLOAD_MB = 20.0


@dataclass
class ServeConfig:
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_concurrent: int = 2  # simultaneous locate computations
    max_queue: int = 8  # requests waiting for a turn; more are answered 503 with Retry-After
    match_cache: int = 64  # recent queries whose match picture can still be drawn
    match_side: int = 640  # longest side of the query image kept for the match picture (as JPEG)
    thumb_size: int = 160


class _Admission:
    """At most ``running`` locates at once and ``queue`` more waiting. :meth:`enter` admits a
    request (None) or, when full, returns the seconds after which to retry, from the recent
    service time and the queue ahead."""

    def __init__(self, running: int, queue: int):
        self.sem = threading.BoundedSemaphore(max(1, running))
        self.running = max(1, running)
        self.queue = max(0, queue)
        self.lock = threading.Lock()
        self.inside = 0  # running + waiting
        self.service_s = 1.0  # moving average of one locate's seconds

    def enter(self) -> int | None:
        with self.lock:
            if self.inside >= self.running + self.queue:
                ahead = self.inside - self.running + 1  # the queue, and one turn for itself
                return max(1, int(-(-ahead * self.service_s // self.running)))
            self.inside += 1
        return None

    def leave(self, seconds: float | None = None) -> None:
        with self.lock:
            self.inside -= 1
            if seconds is not None:
                self.service_s = 0.8 * self.service_s + 0.2 * seconds


def bound_memory() -> None:
    """glibc: at most two malloc arenas, so the request threads do not each keep a heap of their
    own; with :func:`_trim` after each request, freed memory goes back to the system. (A fixed
    1 MB mmap threshold was tried as well: no lower RSS in sequential locates, and it risks
    slower TensorFlow allocations, so it is not used.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _require_framework():
    try:
        import fastapi  # noqa: F401
    except ImportError as e:
        raise DelgGeoError(
            f"`delg-geo serve` needs {e.name}, a delg-geo dependency: pip install -e ."
        ) from None
    try:  # python-multipart parses the uploads (its module was renamed in 0.0.13)
        import python_multipart  # noqa: F401
    except ImportError:
        try:
            import multipart  # noqa: F401
        except ImportError:
            raise DelgGeoError(
                "`delg-geo serve` needs python-multipart, a delg-geo dependency: pip install -e ."
            ) from None


def _dumps(obj) -> bytes:
    return json.dumps(obj, default=json_default).encode()


class _BodyTooLarge(Exception):
    pass


class _UploadLimit:
    """ASGI middleware: 413 for request bodies over ``limit()`` bytes on ``paths``.

    Refuses at once when Content-Length says so; otherwise counts the bytes as they stream in and
    stops reading (and answers 413) as soon as the limit is passed, so a chunked upload cannot
    fill the disk.
    """

    def __init__(self, app, paths=(), limit=lambda: 0, message=lambda n: "upload too large"):
        self.app = app
        self.paths = set(paths)
        self.limit = limit
        self.message = message

    async def _413(self, send, n):
        body = json.dumps({"detail": self.message(n)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        limit = int(self.limit())
        cl = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if cl is not None and cl.isdigit() and int(cl) > limit:
            return await self._413(send, int(cl))
        state = {"n": 0, "over": False, "sent": False}

        async def counted_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["n"] += len(msg.get("body", b""))
                if state["n"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return msg

        async def guarded_send(msg):
            if state["over"]:  # the app's own answer to the aborted read is replaced by the 413
                if not state["sent"]:
                    state["sent"] = True
                    await self._413(send, None)
                return
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["sent"]:
            state["sent"] = True
            await self._413(send, None)


class _MatchStore:
    """What is needed to draw a recent query's match picture on demand (bounded LRU)."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._d: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, rec: dict) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._d[token] = rec
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return token

    def get(self, token: str) -> dict | None:
        with self._lock:
            rec = self._d.get(token)
            if rec is not None:
                self._d.move_to_end(token)
            return rec


def create_app(geolocator, config: ServeConfig | None = None, *, max_upload_mb: float | None = None,
               preload_places: bool = True):
    """The FastAPI app serving ``geolocator`` (loaded once by the caller and shared by all requests)."""
    _require_framework()
    from fastapi import FastAPI, File, HTTPException, Path as ApiPath, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    from . import __version__
    from .explain import render_explain, verify_against
    from .images import LoadedImage, load_image
    from .mapview import leaflet_css, leaflet_js, leaflet_version, reference_path, thumbnail_jpeg, world_outline_geojson
    from .places import _load as _load_places
    from .places import add_places

    cfg = config or ServeConfig()
    if max_upload_mb is not None:
        cfg.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
    geo = geolocator
    index = geo.index
    admission = _Admission(cfg.max_concurrent, cfg.max_queue)
    matches = _MatchStore(cfg.match_cache)
    if preload_places:
        _load_places()

    # -- documented shapes (the responses themselves are Prediction.to_dict(), not re-validated) --
    class PlaceOut(BaseModel):
        name: str = Field(description="nearest GeoNames place (population >= 1000)")
        admin1: str = Field(description="first-level region, e.g. Veneto")
        country_code: str = Field(description="ISO 3166-1 alpha-2")

    class NeighbourOut(BaseModel):
        id: int
        image: str
        lat: float
        lon: float
        similarity: float
        inliers: int

    class AlternativeOut(BaseModel):
        id: int
        image: str
        lat: float
        lon: float
        score: float
        inliers: int
        similarity: float
        distance_km: float
        place: Optional[PlaceOut] = None

    class PredictionOut(BaseModel):
        """``delg-geo query --json`` (``Prediction.to_dict()``) plus the place name."""

        image: str = Field(description="the uploaded file's name")
        lat: float
        lon: float
        method: str = Field(description="'verified' (geometrically verified neighbour) or 'global'")
        confidence: float = Field(ge=0, le=1)
        inliers: int
        neighbour: NeighbourOut
        alternatives: list[AlternativeOut]
        timings_ms: dict[str, float]
        note: str
        place: PlaceOut
        confidence_radius_km: float = Field(description="confidence is the probability of being this close to the truth")
        calibrated: bool = Field(description="false: the index has no calibration and confidence is only a score")
        confidence_text: str = Field(description="the confidence in words, e.g. 'likely within 100 m: 83%'")

    class ErrorOut(BaseModel):
        detail: str

    n_images = len(index)
    lats, lons = np.asarray(index.lats), np.asarray(index.lons)
    info = {
        "service": "delg-geo",
        "version": __version__,
        "model": index.manifest.model_id,
        "num_images": int(n_images),
        "bounds": [[float(lats.min()), float(lons.min())], [float(lats.max()), float(lons.max())]] if n_images else None,
        "max_upload_bytes": cfg.max_upload_bytes,
        "leaflet": leaflet_version(),
    }

    app = FastAPI(
        title="delg-geo",
        version=__version__,
        description="Where was this photo taken? DELG retrieval over geotagged images.",
        docs_url=None,  # the interactive docs pull Swagger UI from a CDN; /openapi.json stays
        redoc_url=None,
    )
    app.state.geolocator = geo
    app.state.config = cfg

    app.add_middleware(_UploadLimit, paths=("/api/locate",), limit=lambda: cfg.max_upload_bytes + 64 * 1024,
                       message=lambda n: _too_large(n))

    def _too_large(n: int | None = None) -> str:
        lim = cfg.max_upload_bytes / (1024 * 1024)
        return f"upload too large{f' ({n / (1024 * 1024):.1f} MB)' if n else ''}: the limit is {lim:g} MB"

    # -- pages and assets ---------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_page_html(info))

    asset_headers = {"Cache-Control": "public, max-age=86400"}

    @app.get("/assets/leaflet.js", include_in_schema=False)
    def asset_leaflet_js():
        return Response(leaflet_js(), media_type="application/javascript", headers=asset_headers)

    @app.get("/assets/leaflet.css", include_in_schema=False)
    def asset_leaflet_css():
        return Response(leaflet_css(), media_type="text/css", headers=asset_headers)

    @app.get("/assets/world.geojson", include_in_schema=False)
    def asset_world():
        return Response(world_outline_geojson(), media_type="application/geo+json", headers=asset_headers)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"ok": True}

    @app.get("/api/info", summary="The index this server answers from")
    def api_info():
        return info

    # -- locate ---------------------------------------------------------------------------------
    def _locate(data: bytes, name: str) -> tuple[dict, str]:
        from .extract import min_image_side
        from .features import features_problem

        retry = admission.enter()
        if retry is not None:
            raise HTTPException(503, f"busy: {admission.inside} photos are being located or waiting; retry in {retry} s",
                                headers={"Retry-After": str(retry)})
        seconds = None
        try:
            with admission.sem:
                t0 = time.perf_counter()
                try:
                    img = load_image(data, max_side=geo.extractor.max_side, min_side=min_image_side(geo.extractor))
                except ImageLoadError as e:
                    raise HTTPException(415, f"not a readable image: {e.reason}") from None
                feats = geo.extractor.extract(img)
                why = features_problem(feats)
                if why:
                    raise HTTPException(415, f"not a usable image: {why}")
                pred = geo.locate_features(feats, name, extract_ms=(time.perf_counter() - t0) * 1e3)
                seconds = time.perf_counter() - t0
        finally:
            admission.leave(seconds)
        d = pred.to_dict()
        if not d.get("place"):  # a Geolocator made with places=False
            add_places(d)
        from PIL import Image

        small = Image.fromarray(img.array)
        small.thumbnail((cfg.match_side, cfg.match_side))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=85)
        vc = geo.config.verify_config
        token = matches.put({
            "jpeg": buf.getvalue(),  # small, so the cache stays a few MB
            "original_size": img.original_size,
            "features": feats.__class__(
                global_descriptor=feats.global_descriptor[:0], keypoints=feats.keypoints[: vc.max_features].copy(),
                local_descriptors=feats.local_descriptors[: vc.max_features].astype(np.float16),
                scores=feats.scores[:0], image_size=feats.image_size, model_id=feats.model_id),
            "neighbour": int(pred.neighbour.id),
            "png": None,
        })
        del img, feats
        _trim()
        return d, token

    @app.post(
        "/api/locate",
        summary="Locate a photo",
        description=(
            "Upload a photo as the multipart field `file`. The answer is what `delg-geo query --json` "
            "prints (`Prediction.to_dict()`), plus `place` (nearest named place of the prediction, and "
            "of each alternative). The `X-Match-Image` header is the URL of the match picture."
        ),
        response_model=None,
        responses={
            200: {"model": PredictionOut, "description": "the prediction",
                  "headers": {"X-Match-Image": {"description": "URL of the match picture (PNG)", "schema": {"type": "string"}}}},
            400: {"model": ErrorOut, "description": "empty upload"},
            413: {"model": ErrorOut, "description": "upload larger than the server's limit"},
            415: {"model": ErrorOut, "description": "not a readable image"},
            503: {"model": ErrorOut, "description": "busy: the queue is full; retry after the Retry-After header's seconds",
                  "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}},
        },
    )
    def api_locate(file: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)")):
        data = file.file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, _too_large())
        if not data:
            raise HTTPException(400, "empty upload: send the photo as the multipart field 'file'")
        name = os.path.basename(file.filename or "") or "<upload>"
        d, token = _locate(data, name)
        return Response(_dumps(d), media_type="application/json",
                        headers={"X-Match-Image": f"/api/match/{token}.png"})

    # -- pictures ---------------------------------------------------------------------------------
    thumb_cache: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()
    thumb_lock = threading.Lock()

    @app.get(
        "/api/thumb/{image_id}",
        summary="Thumbnail of a reference photo",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
    )
    def api_thumb(image_id: int = ApiPath(..., ge=0), size: int = Query(cfg.thumb_size, ge=16, le=640)):
        if image_id >= n_images:
            raise HTTPException(404, f"no reference photo {image_id} (the index has {n_images})")
        key = (image_id, size)
        with thumb_lock:
            jpg = thumb_cache.get(key)
        if jpg is None:
            p = reference_path(index, image_id)
            if p is None:
                raise HTTPException(404, f"the photo of reference {image_id} is not on disk")
            try:
                jpg = thumbnail_jpeg(p, size)
            except ImageLoadError as e:
                raise HTTPException(404, f"reference {image_id}: {e.reason}") from None
            with thumb_lock:
                thumb_cache[key] = jpg
                while len(thumb_cache) > 1024:
                    thumb_cache.popitem(last=False)
        return Response(jpg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get(
        "/api/match/{token}.png",
        summary="Match picture of a recent query",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}},
    )
    def api_match(token: str):
        rec = matches.get(token)
        if rec is None:
            raise HTTPException(404, "unknown or expired match picture; locate the photo again")
        if rec["png"] is None:
            nid = rec["neighbour"]
            npath = reference_path(index, nid)
            if npath is None:
                raise HTTPException(404, f"the photo of reference {nid} is not on disk")
            f = rec["features"]
            f = f.__class__(global_descriptor=f.global_descriptor, keypoints=f.keypoints,
                            local_descriptors=f.local_descriptors.astype(np.float32), scores=f.scores,
                            image_size=f.image_size, model_id=f.model_id)
            q_kp, n_kp, v = verify_against(geo, f, nid)
            small = load_image(rec["jpeg"])
            img = render_explain(LoadedImage(small.array, rec["original_size"], "query"), npath, q_kp, n_kp,
                                 v.inlier_pairs)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rec["png"] = buf.getvalue()
        return Response(rec["png"], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.exception_handler(DelgGeoError)
    async def _delg_error(request: Request, exc: DelgGeoError):
        return JSONResponse(status_code=500, content={"detail": str(exc)})

    return app


# -- the page ---------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>delg-geo: where was this photo taken?</title>
<link rel="stylesheet" href="/assets/leaflet.css">
<style>
%(base_css)s
body { display: flex; height: 100vh; }
#dg-side { width: 360px; overflow-y: auto; padding: 14px 16px; box-sizing: border-box; border-right: 1px solid #ddd; background: #fafafa; }
#dg-map { flex: 1; height: 100%%; }
h1 { font-size: 18px; margin: 0 0 4px; }
.dg-sub { color: #666; font-size: 12px; margin-bottom: 10px; }
#dg-drop { display: block; border: 2px dashed #9ab; border-radius: 8px; padding: 16px; text-align: center; background: #fff; cursor: pointer; }
#dg-drop.dg-over { background: #eef6ff; border-color: #3b7dd8; }
#dg-drop input { display: block; margin: 8px auto 0; max-width: 100%%; }
#dg-status { margin: 10px 0; min-height: 1.4em; }
#dg-status.dg-error { color: #b00020; }
#dg-query img { max-width: 100%%; max-height: 200px; border-radius: 4px; display: block; margin: 6px 0; }
#dg-place { font-size: 18px; font-weight: 600; margin-top: 6px; }
#dg-coords { font-family: ui-monospace, monospace; font-size: 13px; }
.dg-bar { height: 8px; background: #e4e4e4; border-radius: 4px; overflow: hidden; margin: 4px 0 2px; }
.dg-bar div { height: 100%%; background: #2ca02c; }
.dg-small { color: #666; font-size: 12px; }
#dg-matches { list-style: none; padding: 0; margin: 6px 0; }
#dg-matches li { display: flex; gap: 8px; align-items: center; padding: 4px; border-radius: 4px; cursor: pointer; }
#dg-matches li:hover { background: #eef3f8; }
#dg-matches img { width: 64px; height: 64px; object-fit: cover; border-radius: 3px; background: #ddd; flex: none; }
#dg-match-img { max-width: 100%%; border-radius: 4px; margin-top: 6px; cursor: zoom-in; }
h2 { font-size: 14px; margin: 14px 0 4px; }
.dg-hidden { display: none; }
@media (max-width: 760px) { body { flex-direction: column; } #dg-side { width: 100%%; max-height: 55%%; } }
</style>
</head>
<body>
<div id="dg-side">
  <h1>Where was this photo taken?</h1>
  <div class="dg-sub">%(n)s geotagged reference photos &middot; model %(model)s</div>
  <label id="dg-drop" for="dg-file">Drop a photo here, or choose one
    <input id="dg-file" name="file" type="file" accept="image/*">
  </label>
  <div id="dg-status" role="status" aria-live="polite"></div>
  <div id="dg-result" class="dg-hidden">
    <div id="dg-query"></div>
    <div id="dg-place"></div>
    <div id="dg-coords"></div>
    <div class="dg-bar" title="confidence"><div id="dg-conf-bar" style="width:0"></div></div>
    <div id="dg-conf" class="dg-small"></div>
    <div id="dg-note" class="dg-small"></div>
    <h2>Top matches</h2>
    <ul id="dg-matches"></ul>
    <h2>Why: the matched features</h2>
    <a id="dg-match-link" target="_blank"><img id="dg-match-img" alt="query beside its verified neighbour, with the inlier matches"></a>
  </div>
</div>
<div id="dg-map"></div>
<script src="/assets/leaflet.js"></script>
<script id="dg-info" type="application/json">%(info)s</script>
<script>%(base_js)s</script>
<script>
(function () {
  var info = JSON.parse(document.getElementById('dg-info').textContent);
  var map = dgBaseMap('dg-map', null);
  fetch('/assets/world.geojson').then(function (r) { return r.json(); }).then(function (w) { dgAddOutline(map, w); });
  if (info.bounds) map.fitBounds(L.latLngBounds(info.bounds).pad(0.1)); else map.setView([20, 0], 2);
  var layer = L.layerGroup().addTo(map);
  var $ = function (id) { return document.getElementById(id); };
  var busy = false, queryUrl = null;

  function status(text, isError) {
    $('dg-status').textContent = text || '';
    $('dg-status').className = isError ? 'dg-error' : '';
  }
  function placeLabel(p) {
    if (!p) return '';
    return [p.name, p.admin1, p.country_code].filter(function (x) { return x; }).join(', ');
  }
  function thumb(id) { return '/api/thumb/' + encodeURIComponent(id); }

  function show(pred, matchUrl) {
    layer.clearLayers();
    var pts = [[pred.lat, pred.lon]];
    pred.alternatives.forEach(function (a, j) {
      L.marker([a.lat, a.lon], {icon: dgPin('alt', 'alternative ' + (j + 1))})
        .bindPopup('<div class="dg-popup"><b>Alternative ' + (j + 1) + '</b><img alt="" src="' + thumb(a.id) + '"><div>' +
                   dgEsc(placeLabel(a.place)) + '</div><div class="dg-small">' + a.inliers + ' inliers, ' + a.distance_km.toFixed(2) + ' km away</div></div>')
        .addTo(layer);
      pts.push([a.lat, a.lon]);
    });
    var n = pred.neighbour;
    var m = L.marker([pred.lat, pred.lon], {icon: dgPin('pred', 'predicted location'), zIndexOffset: 1000})
      .bindPopup('<div class="dg-popup"><b>' + dgEsc(placeLabel(pred.place)) + '</b><img alt="" src="' + thumb(n.id) + '">' +
                 '<div class="dg-small">' + pred.lat.toFixed(6) + ', ' + pred.lon.toFixed(6) + '</div></div>')
      .addTo(layer);
    if (pts.length > 1) map.fitBounds(L.latLngBounds(pts).pad(0.25), {maxZoom: 17}); else map.setView(pts[0], 16);
    m.openPopup();

    $('dg-place').textContent = placeLabel(pred.place) || 'unknown place';
    $('dg-coords').textContent = pred.lat.toFixed(6) + ', ' + pred.lon.toFixed(6);
    var pc = Math.round(100 * pred.confidence);
    $('dg-conf-bar').style.width = pc + '%%';
    $('dg-conf-bar').style.background = pred.method === 'verified' ? '#2ca02c' : '#ff7f0e';
    $('dg-conf').textContent = (pred.confidence_text || ('confidence ' + pc + '%%')) + ' \\u00b7 ' + (pred.method === 'verified' ? 'geometrically verified' : 'global similarity only') +
      ' \\u00b7 ' + pred.inliers + ' inliers \\u00b7 ' + Math.round(pred.timings_ms.extract + pred.timings_ms.search + pred.timings_ms.verify) + ' ms';
    $('dg-note').textContent = pred.note || '';
    var ul = $('dg-matches');
    ul.innerHTML = '';
    var rows = [{id: n.id, lat: n.lat, lon: n.lon, label: 'best match', place: pred.place, extra: n.inliers + ' inliers, similarity ' + n.similarity.toFixed(3)}];
    pred.alternatives.forEach(function (a, j) {
      rows.push({id: a.id, lat: a.lat, lon: a.lon, label: 'alternative ' + (j + 1), place: a.place,
                 extra: a.inliers + ' inliers, ' + a.distance_km.toFixed(2) + ' km away'});
    });
    rows.forEach(function (r) {
      var li = document.createElement('li');
      li.className = 'dg-match';
      li.innerHTML = '<img alt="" loading="lazy" src="' + thumb(r.id) + '"><div><div><b>' + dgEsc(r.label) + '</b> ' + dgEsc(placeLabel(r.place)) +
                     '</div><div class="dg-small">' + dgEsc(r.extra) + '</div></div>';
      li.addEventListener('click', function () { map.setView([r.lat, r.lon], Math.max(map.getZoom(), 16)); });
      ul.appendChild(li);
    });
    if (matchUrl) { $('dg-match-img').src = matchUrl; $('dg-match-link').href = matchUrl; }
    $('dg-result').className = '';
  }

  function upload(file) {
    if (!file || busy) return;
    if (file.size > info.max_upload_bytes) {
      status('This file is ' + (file.size / 1048576).toFixed(1) + ' MB; the limit is ' + (info.max_upload_bytes / 1048576) + ' MB.', true);
      return;
    }
    busy = true;
    status('Locating ' + file.name + '\\u2026');
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = URL.createObjectURL(file);
    $('dg-query').innerHTML = '';
    var img = document.createElement('img'); img.alt = 'your photo'; img.src = queryUrl; $('dg-query').appendChild(img);
    var fd = new FormData();
    fd.append('file', file, file.name);
    fetch('/api/locate', {method: 'POST', body: fd}).then(function (r) {
      return r.json().catch(function () { return {detail: r.status + ' ' + r.statusText}; }).then(function (body) {
        if (!r.ok) throw new Error(body.detail || (r.status + ' ' + r.statusText));
        show(body, r.headers.get('X-Match-Image'));
        status('Located ' + file.name + '.');
      });
    }).catch(function (e) {
      status('Could not locate ' + file.name + ': ' + e.message, true);
    }).then(function () { busy = false; $('dg-file').value = ''; });
  }

  $('dg-file').addEventListener('change', function (e) { upload(e.target.files[0]); });
  var drop = $('dg-drop');
  ['dragenter', 'dragover'].forEach(function (ev) {
    document.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.add('dg-over'); });
  });
  ['dragleave', 'drop'].forEach(function (ev) {
    document.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.remove('dg-over'); });
  });
  document.addEventListener('drop', function (e) {
    var f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) upload(f);
  });
})();
</script>
</body>
</html>
"""


def _page_html(info: dict) -> str:
    import html

    from .mapview import BASE_CSS, BASE_MAP_JS, _json_for_html

    return _PAGE % {
        "base_css": BASE_CSS,
        "base_js": BASE_MAP_JS,
        "info": _json_for_html(info),
        "n": f"{info['num_images']:,}",
        "model": html.escape(str(info["model"])),
    }


# -- running ------------------------------------------------------------------------------------------

def warm_up(geolocator) -> None:
    """Trace the extractor once so the first request does not pay for it."""
    from .images import LoadedImage

    arr = np.full((256, 256, 3), 127, np.uint8)
    try:
        geolocator.extractor.extract(LoadedImage(arr, (256, 256), "<warm-up>"))
    except Exception:  # noqa: BLE001 - warm-up is best effort
        pass


def run_server(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model: str | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_concurrent: int = 2, log_level: str = "info",
               device: str = "auto", max_queue: int = 8) -> None:
    """Load the index and model once, then serve until interrupted."""
    _require_framework()
    import uvicorn

    from .locate import Geolocator

    bound_memory()
    geo = Geolocator.from_index(index_dir, model=model, device=device)
    warm_up(geo)
    app = create_app(geo, ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_concurrent=max_concurrent,
                                      max_queue=max_queue))
    uvicorn.run(app, host=host, port=port, log_level=log_level)

"""The routes of ``delg-geo serve``, in three groups: the page and its assets, locating an upload,
and the pictures (thumbnails and match pictures). :func:`delg_geo.apps.serve.create_app` adds
them to one FastAPI app."""

import collections
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import File, HTTPException, Path as ApiPath, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from delg_geo.apps.serve_schema import ErrorOut, PredictionOut
from delg_geo.core.errors import ImageLoadError
from delg_geo.core.jsonio import dumps as json_dumps
from delg_geo.core.memory import trim_memory

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _dumps(obj) -> bytes:
    return json_dumps(obj).encode()



def page_html(info: dict) -> str:
    """The page (``static/index.html``) with the index's size, model and info filled in."""
    import html

    from delg_geo.evaluation.mapview import _json_for_html

    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return (page.replace("{{n}}", f"{info['num_images']:,}").replace("{{model}}", html.escape(str(info["model"])))
            .replace("{{info}}", _json_for_html(info)))


def add_page_routes(app, info: dict, health=lambda: None) -> None:
    """``/`` (the page), ``/assets/...`` (Leaflet, the shared map code, the page's own script and
    style under ``/assets/static/``), ``/favicon.ico``, ``/healthz`` and ``/api/info``.
    ``/healthz`` answers 200 ``{"ok": true}``, or 503 ``{"ok": false, "reason": ...}`` once
    ``health()`` gives a reason (the index's files deleted or replaced)."""
    from delg_geo.evaluation.mapview import BASE_CSS, BASE_MAP_JS, leaflet_css, leaflet_js, world_outline_geojson

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(page_html(info))

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

    @app.get("/assets/base.css", include_in_schema=False)
    def asset_base_css():
        return Response(BASE_CSS, media_type="text/css", headers=asset_headers)

    @app.get("/assets/base-map.js", include_in_schema=False)
    def asset_base_js():
        return Response(BASE_MAP_JS, media_type="application/javascript", headers=asset_headers)

    app.mount("/assets/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        why = health()
        if why:
            return Response(_dumps({"ok": False, "reason": why}), status_code=503, media_type="application/json")
        return {"ok": True}

    @app.get("/api/info", summary="The index this server answers from")
    def api_info():
        return info



def add_locate_route(app, geo, cfg, admission, matches, too_large, health=lambda: None) -> None:
    """``POST /api/locate``: at most ``cfg.max_upload_bytes``, admitted by ``admission``; the match
    picture's inputs go to ``matches``. ``health()`` gives why the index cannot be trusted any
    more (its files deleted or replaced), or None; then the answer is 503 with that reason."""
    from delg_geo.core.places import add_places
    from delg_geo.features.images import load_image

    def _locate(data: bytes, name: str) -> tuple[dict, str]:
        from delg_geo.apps.explain import answer_caption, verify_against
        from delg_geo.features.base import features_problem
        from delg_geo.features.extract import min_image_side
        from delg_geo.retrieval.locate import extract_one

        unhealthy = health()
        if unhealthy:
            raise HTTPException(503, f"the index is unavailable: {unhealthy}")
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
                try:
                    feats = extract_one(geo.extractor, img, name)
                except ImageLoadError as e:
                    raise HTTPException(422, f"not a usable image: {e.reason}") from None
                why = features_problem(feats)
                if why:
                    raise HTTPException(415, f"not a usable image: {why}")
                pred = geo.locate_features(feats, name, extract_ms=(time.perf_counter() - t0) * 1e3)
                if pred.matches is None:  # verification off: the neighbour's matches, for the picture only
                    q_kp, n_kp, v = verify_against(geo, feats, pred.neighbour.id)
                    pairs = np.asarray(v.inlier_pairs, np.int64).reshape(-1, 2)
                    pred.matches = np.hstack([np.asarray(q_kp, np.float32)[pairs[:, 0]],
                                              np.asarray(n_kp, np.float32)[pairs[:, 1]]])
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
        token = matches.put({
            "jpeg": buf.getvalue(),  # small, so the cache stays a few MB
            "original_size": img.original_size,
            # the answer's own inlier matches: the picture shows the count the answer reports
            "query_points": pred.matches[:, :2].copy(),
            "neighbour_points": pred.matches[:, 2:].copy(),
            "caption": answer_caption(pred.method, len(pred.matches), geo.rule.min_inliers, pred.note),
            "verified": pred.method == "verified",
            "neighbour": int(pred.neighbour.id),
            "png": None,
        })
        del img, feats
        trim_memory()
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
            415: {"model": ErrorOut, "description": "not a readable image (or too small, or too elongated, to describe)"},
            422: {"model": ErrorOut, "description": "no multipart field 'file', or an image the model cannot describe"},
            503: {"model": ErrorOut, "description": "busy (the queue is full; retry after the Retry-After header's "
                                                    "seconds), or the index folder was deleted or replaced",
                  "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}},
        },
    )
    def api_locate(file: UploadFile = File(..., description="the photo (JPEG, PNG, WebP, ...)")):
        data = file.file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(413, too_large())
        if not data:
            raise HTTPException(400, "empty upload: send the photo as the multipart field 'file'")
        name = os.path.basename(file.filename or "") or "<upload>"
        d, token = _locate(data, name)
        return Response(_dumps(d), media_type="application/json",
                        headers={"X-Match-Image": f"/api/match/{token}.png"})



def add_picture_routes(app, geo, cfg, matches) -> None:
    """``GET /api/thumb/{id}`` (reference thumbnails, cached) and ``GET /api/match/{token}.png``
    (the query beside its verified neighbour, drawn on first request)."""
    from delg_geo.apps.explain import render_explain
    from delg_geo.evaluation.mapview import reference_path, thumbnail_jpeg
    from delg_geo.features.images import LoadedImage, load_image

    index = geo.index
    n_images = len(index)
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
            small = load_image(rec["jpeg"])
            n = len(rec["query_points"])
            img = render_explain(LoadedImage(small.array, rec["original_size"], "query"), npath, rec["query_points"],
                                 rec["neighbour_points"], np.stack([np.arange(n), np.arange(n)], axis=1),
                                 caption=rec["caption"], verified=rec["verified"])
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rec["png"] = buf.getvalue()
        return Response(rec["png"], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

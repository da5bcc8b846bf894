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
* ``GET /api/info``, ``GET /openapi.json``.
* ``GET /healthz`` — 200 ``{"ok": true}``; 503 ``{"ok": false, "reason": ...}`` once the index
  folder's files are gone or were replaced (deleted, rebuilt, added to) since the server loaded
  them (:class:`IndexWatch`); ``/api/locate`` then answers 503 with the same reason, since the
  loaded index no longer is the one on disk. Restart the server to load the new one.

Requests run in the server's thread pool; at most ``max_concurrent`` locate at once (each one
gets its own features and answer; the Geolocator holds no per-request state) and at most
``max_queue`` more wait for their turn: beyond that the answer is 503 with ``Retry-After`` (the
seconds the queue ahead should take), never an unbounded wait. Memory stays bounded: uploads are
decoded straight to the model's working size (``max_side``), the match pictures kept for recent
queries are small JPEGs, and freed memory is handed back to the system after each request
(:func:`bound_memory`).
"""

import collections
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.memory import bound_memory, trim_memory  # noqa: F401 (public here too)

DEFAULT_MAX_UPLOAD_MB = 20.0


def upload_limit_problem(max_upload_mb) -> str | None:
    """Why ``max_upload_mb`` cannot be an upload limit (not a number, NaN, infinite, zero or
    negative, beyond 100 GB), or None."""
    import math

    try:
        v = float(max_upload_mb)
    except (TypeError, ValueError):
        return f"must be a number of megabytes, got {max_upload_mb!r}"
    if not math.isfinite(v) or v <= 0:
        return f"must be a positive number of megabytes, got {max_upload_mb}"
    if v > 100_000:
        return f"must be at most 100000 MB, got {max_upload_mb}"
    return None


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


class IndexWatch:
    """Notices when the files of a loaded index are deleted or replaced.

    Records the device, inode, size and modification time of ``manifest.json`` and of every file
    the manifest lists when the server starts; :meth:`problem` compares them again (a few
    ``stat`` calls) and says what changed, or returns None.
    """

    def __init__(self, index_dir: str | Path, files=()):
        self.path = Path(index_dir)
        self.names = ["manifest.json", *sorted(set(files) - {"manifest.json"})]
        self.build_id = self._build_id()
        self.stats = {n: self._stat(n) for n in self.names}

    def _stat(self, name: str):
        import os

        try:
            st = os.stat(self.path / name)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _build_id(self) -> str:
        try:
            return str(json.loads((self.path / "manifest.json").read_text()).get("build_id", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def problem(self) -> str | None:
        if not self.path.is_dir():
            return f"the index folder {self.path} is gone; restart the server with an index"
        for name in self.names:
            now = self._stat(name)
            if now == self.stats[name]:
                continue
            if now is None:
                return f"{self.path / name} is gone (deleted since the server loaded the index); restart the server"
            bid = self._build_id()
            what = (f"build {bid or '?'} replaced build {self.build_id or '?'}" if bid != self.build_id
                    else f"{name} changed")
            return f"the index {self.path} was replaced on disk ({what}); restart the server to load it"
        return None


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
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from delg_geo import __version__
    from delg_geo.apps.serve_routes import add_locate_route, add_page_routes, add_picture_routes
    from delg_geo.core.places import _load as _load_places
    from delg_geo.evaluation.mapview import leaflet_version

    from delg_geo.core.errors import InvalidArgumentError

    cfg = config or ServeConfig()
    if max_upload_mb is not None:
        why = upload_limit_problem(max_upload_mb)
        if why:
            raise InvalidArgumentError(f"max_upload_mb {why}")
        cfg.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
    if cfg.max_upload_bytes < 1:
        raise InvalidArgumentError(f"max_upload_bytes must be at least 1, got {cfg.max_upload_bytes}")
    geo = geolocator
    index = geo.index
    admission = _Admission(cfg.max_concurrent, cfg.max_queue)
    matches = _MatchStore(cfg.match_cache)
    if preload_places:
        _load_places()

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

    watch = IndexWatch(index.path, index.manifest.files)
    app.state.index_watch = watch
    add_page_routes(app, info, watch.problem)
    add_locate_route(app, geo, cfg, admission, matches, _too_large, watch.problem)
    add_picture_routes(app, geo, cfg, matches)

    @app.exception_handler(DelgGeoError)
    async def _delg_error(request: Request, exc: DelgGeoError):
        from delg_geo.core.errors import ImageLoadError, InvalidArgumentError

        # a refused input is the client's (4xx), never a server error
        status = 415 if isinstance(exc, ImageLoadError) else 422 if isinstance(exc, InvalidArgumentError) else 500
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return app


# -- running ------------------------------------------------------------------------------------------

def warm_up(geolocator) -> None:
    """Trace the extractor once so the first request does not pay for it."""
    from delg_geo.features.images import LoadedImage

    arr = np.full((256, 256, 3), 127, np.uint8)
    try:
        geolocator.extractor.extract(LoadedImage(arr, (256, 256), "<warm-up>"))
    except Exception:  # noqa: BLE001 - warm-up is best effort
        pass


def run_server(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model: str | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_concurrent: int = 2, log_level: str = "info",
               device: str = "auto", max_queue: int = 8) -> None:
    """Load the index and model once, then serve until interrupted. The options are checked
    before anything is loaded."""
    from delg_geo.core.errors import InvalidArgumentError

    why = upload_limit_problem(max_upload_mb)
    if why:
        raise InvalidArgumentError(f"--max-upload-mb {why}")
    if not (isinstance(port, int) and 0 < port < 65536):
        raise InvalidArgumentError(f"--port must be a TCP port, 1 to 65535, got {port}")
    _require_framework()
    import uvicorn

    from delg_geo.retrieval.locate import Geolocator

    bound_memory()
    geo = Geolocator.from_index(index_dir, model=model, device=device)
    warm_up(geo)
    app = create_app(geo, ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_concurrent=max_concurrent,
                                      max_queue=max_queue))
    uvicorn.run(app, host=host, port=port, log_level=log_level)

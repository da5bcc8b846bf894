"""Load test of `delg-geo serve`: latency, errors, busy answers and memory under concurrent uploads.

Starts the server in this process on 127.0.0.1 (a free port) over the index given, sends a bounded
number of concurrent ``POST /api/locate`` requests (bounded in time too), and prints one JSON
object: p50/p95/max latency, throughput, the error count, and the 503 (busy, with Retry-After)
count. Traffic stays on the loopback interface.

    python tools/bench_serve.py --index INDEX_DIR [--requests 40] [--concurrency 4] [--time-limit 120]
                                [--images DIR_OR_CSV_OR_FILES ...] [--rounds 5] [--big]
                                [--max-concurrent 2] [--max-queue 8]

``--rounds R`` repeats the load R times and reports, per round, the latency p50/max and the
process's resident memory (RSS, from /proc) after it, and the RSS growth after the first round.
``--big`` adds one 6000x6000 JPEG upload to every round. Photos default to the index's own
reference photos (metadata ``path``), in order, cycled.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MAX_REQUESTS = 2000
MAX_CONCURRENCY = 32
MAX_TIME_S = 1800
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(images: list[str], index_dir: Path, limit: int) -> list[Path]:
    out: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXT)
        elif p.suffix.lower() == ".csv":
            import pandas as pd

            df = pd.read_csv(p)
            col = "path" if "path" in df.columns else "image"
            out += [(p.parent / v) if not Path(v).is_absolute() else Path(v) for v in df[col].astype(str)]
        else:
            out.append(p)
    if not images:
        import pandas as pd

        md = pd.read_csv(index_dir / "metadata.csv")
        out = [Path(v) for v in md["path"].astype(str)] if "path" in md.columns else []
    out = [p for p in out if p.is_file()][: max(1, limit)]
    if not out:
        raise SystemExit("bench_serve: no photos found (give --images, or an index whose metadata paths exist)")
    return out


def _multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def _big_jpeg(photo: Path, side: int = 6000) -> bytes:
    """A ``side`` x ``side`` JPEG made from a real photo (upscaled), as a phone's large upload."""
    import io

    from PIL import Image

    img = Image.open(photo).convert("RGB").resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _start_server(index_dir: Path, port: int, max_concurrent: int, model: str | None, max_queue: int = 8):
    import uvicorn

    from delg_geo.apps import serve
    from delg_geo.retrieval.locate import Geolocator
    from delg_geo.apps.serve import ServeConfig, create_app, warm_up

    t0 = time.perf_counter()
    if hasattr(serve, "bound_memory"):  # as `delg-geo serve` does (older versions had none)
        serve.bound_memory()
    geo = Geolocator.from_index(index_dir, model=model)
    warm_up(geo)
    try:
        cfg = ServeConfig(max_concurrent=max_concurrent, max_queue=max_queue)
    except TypeError:  # a version without a bounded queue: the baseline
        cfg = ServeConfig(max_concurrent=max_concurrent)
    app = create_app(geo, cfg)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        if not th.is_alive() or time.perf_counter() - t0 > 600:
            raise SystemExit("bench_serve: the server did not start")
        time.sleep(0.05)
    return srv, th, time.perf_counter() - t0


def run(index_dir: Path, requests: int = 40, concurrency: int = 4, time_limit: float = 120.0,
        images: list[str] | None = None, max_concurrent: int = 2, model: str | None = None,
        warmup_requests: int = 1, rounds: int = 1, big: bool = False, max_queue: int = 8) -> dict:
    requests = max(1, min(int(requests), MAX_REQUESTS))
    concurrency = max(1, min(int(concurrency), MAX_CONCURRENCY))
    time_limit = max(1.0, min(float(time_limit), MAX_TIME_S))
    rounds = max(1, min(int(rounds), 50))
    photos = _photos(images or [], index_dir, limit=requests)
    bodies = [_multipart(p.read_bytes(), p.name) for p in photos]
    big_body = _multipart(_big_jpeg(photos[0]), "big6000.jpg") if big else None
    port = _free_port()
    srv, th, startup_s = _start_server(index_dir, port, max_concurrent, model, max_queue)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    busy: list[str] = []  # Retry-After values of 503 answers
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit

    def one(k: int, record: bool = True) -> None:
        if time.perf_counter() > deadline:
            return
        body, ctype = big_body if (big_body is not None and k < 0) else bodies[k % len(bodies)]
        t = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(5.0, deadline - t + 5))
            conn.request("POST", "/api/locate", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            payload = resp.read()
            retry_after = resp.getheader("Retry-After")
            conn.close()
            status = resp.status
            ok = status == 200 and "lat" in json.loads(payload)
            err = None if ok else f"HTTP {status}: {payload[:200]!r}"
            if status == 503 and retry_after:  # busy: answered at once, with when to retry
                if record:
                    with lock:
                        busy.append(retry_after)
                        statuses["503"] = statuses.get("503", 0) + 1
                return
        except Exception as e:  # noqa: BLE001
            status, err = "exception", f"{type(e).__name__}: {e}"
        dt = (time.perf_counter() - t) * 1e3
        if not record:
            return
        with lock:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if err:
                errors.append(err)
            else:
                latencies.append(dt)

    import numpy as np

    per_round = []
    try:
        for k in range(max(0, warmup_requests)):
            one(k, record=False)
        rss_start = _rss_mb()
        t0 = time.perf_counter()
        for r in range(rounds):
            n_before, b_before = len(latencies), len(busy)
            t_r = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                ks = list(range(r * requests, (r + 1) * requests))
                if big_body is not None:
                    ks[0] = -1  # this round's 6000x6000 upload
                list(pool.map(one, ks))
            lat_r = np.array(latencies[n_before:]) if len(latencies) > n_before else np.array([np.nan])
            per_round.append({
                "round": r + 1, "ok": len(latencies) - n_before, "busy_503": len(busy) - b_before,
                "p50_ms": round(float(np.nanpercentile(lat_r, 50)), 1), "max_ms": round(float(np.nanmax(lat_r)), 1),
                "seconds": round(time.perf_counter() - t_r, 2), "rss_mb": _rss_mb(),
            })
        wall = time.perf_counter() - t0
    finally:
        srv.should_exit = True
        th.join(30)

    lat = np.array(latencies) if latencies else np.array([np.nan])
    done = len(latencies) + len(errors) + statuses.get("503", 0)
    rss = [p["rss_mb"] for p in per_round]
    return {
        "index": str(index_dir),
        "requests": requests * rounds,
        "rounds": per_round,
        "rss_start_mb": rss_start,
        "rss_growth_after_first_round": round(max(rss[1:]) / rss[0] - 1, 4) if len(rss) > 1 else None,
        "busy_503": len(busy),
        "retry_after_s": sorted({int(v) for v in busy}) if busy else [],
        "big_upload": bool(big),
        "server_max_queue": max_queue,
        "completed": done,
        "ok": len(latencies),
        "errors": len(errors),
        "not_sent_time_limit": requests * rounds - done,
        "status_counts": statuses,
        "concurrency": concurrency,
        "server_max_concurrent": max_concurrent,
        "photos": len(photos),
        "p50_ms": round(float(np.nanpercentile(lat, 50)), 1) if latencies else None,
        "p95_ms": round(float(np.nanpercentile(lat, 95)), 1) if latencies else None,
        "max_ms": round(float(np.nanmax(lat)), 1) if latencies else None,
        "mean_ms": round(float(np.nanmean(lat)), 1) if latencies else None,
        "throughput_rps": round(len(latencies) / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 2),
        "startup_s": round(startup_s, 2),
        "first_errors": errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, type=Path, help="index folder to serve")
    ap.add_argument("--requests", "-n", type=int, default=40, help=f"requests to send (at most {MAX_REQUESTS})")
    ap.add_argument("--concurrency", "-c", type=int, default=4, help=f"client threads (at most {MAX_CONCURRENCY})")
    ap.add_argument("--time-limit", type=float, default=120.0, help=f"seconds; later requests are not sent (at most {MAX_TIME_S})")
    ap.add_argument("--max-concurrent", type=int, default=2, help="the server's simultaneous locates")
    ap.add_argument("--images", nargs="*", default=[], help="photos: files, folders or a CSV (image/path column)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the load this many times (RSS after each)")
    ap.add_argument("--big", action="store_true", help="one 6000x6000 JPEG upload in every round")
    ap.add_argument("--max-queue", type=int, default=8, help="the server's waiting requests before 503")
    args = ap.parse_args(argv)
    res = run(args.index, args.requests, args.concurrency, args.time_limit, args.images, args.max_concurrent, args.model,
              rounds=args.rounds, big=args.big, max_queue=args.max_queue)
    print(json.dumps(res))
    return 0 if res["errors"] == 0 and res["ok"] > 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

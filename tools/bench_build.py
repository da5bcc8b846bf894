"""Benchmark: the default `index build` against `--local delg`, its kernel share, and processes sharing the machine.

    python tools/bench_build.py [--n 40] [--cases ratio,pair,query,ray] [--cwd TREE] [--label after]
                                [--out docs/results/extraction.json]

Every case runs `delg-geo` as separate processes on the first ``--n`` rows of the Venice
``reference.csv`` and compares them within the same run, so the figures are ratios that hold
on any host:

* ``ratio``: the default build (ALIKED-n16 local features) and ``--local delg``: extraction
  throughput of each, their ratio, and the kernel's share of each build's CPU time (rusage);
* ``pair``: two default builds one after the other against the same two started together
  (target: together within 1.2x the time of one after the other);
* ``query``: ``POST /api/locate`` on a running ``serve``, one photo at a time (the warm query
  latency), alone and while a build runs beside it (target: within 2x); a cold ``delg-geo
  query`` (process start to answer; target: at most 2x the warm latency plus 5 s); and the
  extract, search and verify timings ``query --json`` reports (two photos in flight);
* ``ray``: ``index build --ray --workers 2`` against one process (end to end).

``--cwd`` runs another checkout's code (an older commit's, for a before/after comparison in
one session); ``--out`` merges this run's results, under ``--label``, into a results JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "venice"
CASES = ("ratio", "pair", "query", "ray")


class Proc:
    """A ``delg-geo`` process whose CPU time is read from its own rusage (``os.wait4``)."""

    def __init__(self, args: list[str], cwd: Path, env: dict, out: Path):
        self.out = out
        self.t0 = time.perf_counter()
        with open(out, "wb") as f, open(out.with_suffix(".err"), "wb") as e:
            self.p = subprocess.Popen([sys.executable, "-m", "delg_geo", *args], cwd=cwd, env=env, stdout=f, stderr=e)

    def finish(self) -> dict:
        _, status, ru = os.wait4(self.p.pid, 0)
        self.p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.t0
        if self.p.returncode != 0:
            raise SystemExit(f"{self.p.args}: exit {self.p.returncode}: {self.out.with_suffix('.err').read_text()[-2000:]}")
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        cpu = ru.ru_utime + ru.ru_stime
        return dict(wall_s=round(wall, 2), cpu_user_s=round(ru.ru_utime, 2), cpu_sys_s=round(ru.ru_stime, 2),
                    kernel_share=round(ru.ru_stime / cpu, 3) if cpu else None, max_rss_mb=ru.ru_maxrss // 1024,
                    json=[json.loads(ln) for ln in lines])


class Bench:
    def __init__(self, args, tmp: Path):
        import pandas as pd

        self.args, self.tmp = args, tmp
        self.env = dict(os.environ)
        ref = pd.read_csv(args.data / "reference.csv")
        self.meta = tmp / "ref.csv"
        ref.iloc[: args.n].to_csv(self.meta, index=False)
        q = pd.read_csv(args.data / "queries.csv")
        self.queries = [str(args.data / p) for p in q.image.iloc[: args.queries]]
        self.k = 0

    def start_build(self, *extra: str) -> Proc:
        self.k += 1
        index = self.tmp / f"index{self.k}"
        return Proc(["index", "build", str(self.args.data), "--metadata", str(self.meta), "--index", str(index),
                     "--no-calibrate", "--json", "--overwrite", *self.args.build_option, *extra],
                    self.args.cwd, self.env, self.tmp / f"build{self.k}.out")

    def build(self, *extra: str) -> dict:
        r = self.start_build(*extra).finish()
        rep = r.pop("json")[-1]
        r.update(index=rep["index_dir"], images=rep["num_images"], extract_s=round(rep["extract_seconds"], 2),
                 images_per_s=round(rep["num_images"] / rep["extract_seconds"], 3),
                 end_to_end_images_per_s=round(rep["num_images"] / r["wall_s"], 3))
        return r


def case_ratio(b: Bench) -> dict:
    default = b.build()
    delg = b.build("--local", "delg")
    b.default_index = default["index"]
    b.default_run = default
    return dict(default=default, local_delg=delg,
                throughput_ratio_default_to_delg=round(default["images_per_s"] / delg["images_per_s"], 3),
                kernel_share_default=default["kernel_share"], kernel_share_delg=delg["kernel_share"])


def case_pair(b: Bench) -> dict:
    first = getattr(b, "default_run", None) or b.build()
    second = b.build()
    t0 = time.perf_counter()
    procs = [b.start_build(), b.start_build()]
    together = [p.finish() for p in procs]
    wall_together = time.perf_counter() - t0
    for r in together:
        r.pop("json")
    sequential = first["wall_s"] + second["wall_s"]
    return dict(one_after_the_other_s=round(sequential, 2), together_s=round(wall_together, 2),
                together_over_sequential=round(wall_together / sequential, 3),
                cpu_s_per_build_alone=round((first["cpu_user_s"] + first["cpu_sys_s"] + second["cpu_user_s"] + second["cpu_sys_s"]) / 2, 1),
                cpu_s_per_build_together=round(sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in together) / 2, 1),
                kernel_share_together=[r["kernel_share"] for r in together])


def _multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post_latencies(port: int, photos: list[str], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for p in photos:
            body, ctype = _multipart(Path(p).read_bytes(), Path(p).name)
            t = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/api/locate", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                out.append((time.perf_counter() - t) * 1e3)
    return out


def _serve(b: Bench, index: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["-m", "delg_geo", "serve", "--index", index, "--port", str(port)]
    if b.args.serve_via_api:  # a checkout whose command line has no `serve`
        cmd = ["-c", "import sys; from delg_geo.apps.serve import run_server; run_server(sys.argv[1], port=int(sys.argv[2]))",
               index, str(port)]
    p = subprocess.Popen([sys.executable, *cmd], cwd=b.args.cwd, env=b.env, stdout=subprocess.DEVNULL,
                         stderr=open(b.tmp / "serve.err", "wb"))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return p, port
        except OSError:
            time.sleep(1)
    p.kill()
    raise SystemExit(f"serve did not start: {(b.tmp / 'serve.err').read_text()[-2000:]}")


def case_query(b: Bench) -> dict:
    index = getattr(b, "default_index", None) or b.build()["index"]
    warm = Proc(["query", *b.queries, "--index", index, "--json"], b.args.cwd, b.env, b.tmp / "query.out").finish()
    t = [sum(r["timings_ms"][k] for k in ("extract", "search", "verify")) for r in warm["json"][1:] if "timings_ms" in r]
    cold = Proc(["query", b.queries[0], "--index", index, "--json"], b.args.cwd, b.env, b.tmp / "cold.out").finish()
    srv, port = _serve(b, index)
    try:
        _post_latencies(port, b.queries[:1], 1)  # warm-up
        alone = _post_latencies(port, b.queries, 1)
        build = b.start_build()
        time.sleep(b.args.build_head_start)  # past the build's model loading, into extraction
        loaded = _post_latencies(port, b.queries, 1)
        build.finish()
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    p50 = statistics.median
    warm = p50(alone)  # one photo at a time, warm: upload, extract, search, verify, answer
    return dict(index_images=b.args.n, queries=len(b.queries),
                query_cli_p50_ms_two_in_flight=round(p50(t), 1) if t else None,
                warm_query_p50_ms=round(warm, 1), cold_query_s=cold["wall_s"],
                cold_over_its_limit=round(cold["wall_s"] / (2 * warm / 1e3 + 5), 3),
                serve_p50_ms_alone=round(warm, 1), serve_p50_ms_with_build=round(p50(loaded), 1),
                serve_with_build_over_alone=round(p50(loaded) / warm, 3))


def case_ray(b: Bench) -> dict:
    one = getattr(b, "default_run", None) or b.build()
    ray2 = b.build("--ray", "--workers", "2")
    return dict(one_process_images_per_s=one["end_to_end_images_per_s"], ray_2_workers_images_per_s=ray2["end_to_end_images_per_s"],
                ray_over_one_process=round(ray2["end_to_end_images_per_s"] / one["end_to_end_images_per_s"], 3))


def _machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return dict(cores=len(os.sched_getaffinity(0)), gpu=False, cpu_model=model)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=40, help="reference photos per build")
    ap.add_argument("--queries", type=int, default=8, help="query photos (the first is the warm-up)")
    ap.add_argument("--cases", default="ratio,pair,query", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--cwd", type=Path, default=REPO, help="run this checkout's code")
    ap.add_argument("--label", default="run")
    ap.add_argument("--build-option", action="append", default=[], help="extra `index build` option (repeat)")
    ap.add_argument("--build-head-start", type=float, default=15.0, help="seconds a build runs before the loaded queries")
    ap.add_argument("--out", type=Path, help="merge the results into this JSON, under --label")
    ap.add_argument("--serve-via-api", action="store_true", help="start the server with run_server, not `delg-geo serve`")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    res = dict(load_average_before=list(os.getloadavg()), n=args.n)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args, Path(tmp))
        for c in cases:
            res[c] = globals()[f"case_{c}"](b)
            print(json.dumps({c: res[c]}), file=sys.stderr)
    res.update(load_average_after=list(os.getloadavg()), bench_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(res, indent=2))
    if args.out:
        _merge(args.out, args.label, res, argv)
    return res


def _merge(path: Path, label: str, res: dict, argv) -> None:
    doc = json.loads(path.read_text()) if path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc.update(command="python tools/bench_build.py " + " ".join(sys.argv[1:] if argv is None else argv),
               commit=commit, date=date.today().isoformat(), machine=_machine())
    doc.setdefault("results", {})[label] = res
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Stage 1 of ``delg-geo bench --ray``: query shards extracted, searched and verified on Ray workers.

Each worker opens the index once (the model named in its manifest, the FAISS index, the local
features memory-mapped) and runs :func:`delg_geo.evaluation.bench.query_candidates`, the very function a
single-process bench runs, over one shard of queries after another. It writes each shard's
result as ``OUT/.queries/part-NNNNN.npz`` (a temporary file renamed into place), failed queries
included with their reasons. A killed bench, rerun with the same command, keeps the finished
shards (``OUT/.queries/state.json`` says what they were computed for; anything else starts
over). The driver then reads the shards in query order and every later stage of the bench is
the single-process code. The index folder, the images and OUT must be on storage every node sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from delg_geo.evaluation.candidates import QueryCandidates, query_candidates
from delg_geo.index.geo_index import read_manifest, write_atomic
from delg_geo.core.ray_pool import RayOptions, check_shared, plan_workers, ray_session, run_shards, shard_runs, start_actors

SHARDS = ".queries"


class QueryWorker:
    """A Ray actor: one index and model, many query shards."""

    def __init__(self, index_dir: str, verify_threads: int, local_top_k: int = 100):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from delg_geo.retrieval.locate import Geolocator, LocateConfig
        from delg_geo.core.runtime import configure_for_throughput

        check_shared(socket.gethostname(), [(f"{index_dir}/manifest.json", "the index folder")])
        configure_for_throughput()
        self.geo = Geolocator.from_index(index_dir, config=LocateConfig(places=False, workers=verify_threads,
                                                                        local_top_k=local_top_k))

    def ready(self, shards_dir: str, probe_image: str | None) -> dict:
        host = socket.gethostname()
        check_shared(host, [(f"{shards_dir}/state.json", "the output folder"), (probe_image, "the query images")])
        return dict(host=host, pid=os.getpid())

    def run_shard(self, shards_dir: str, number: int, items: list[tuple[int, str]], search_k: int, verify_k: int,
                  threads: int, keep_global: bool) -> dict:
        t0 = time.perf_counter()
        qc = query_candidates(self.geo, [p for _, p in items], [i for i, _ in items], search_k, verify_k, threads,
                              keep_global=keep_global)
        qc.save(Path(shards_dir) / f"part-{number:05d}.npz")
        return dict(number=number, done=len(qc.positions), failed=len(qc.failed), seconds=time.perf_counter() - t0)


def _state(index_dir: Path, items, search_k: int, verify_k: int, keep_global: bool) -> dict:
    m = read_manifest(index_dir)
    h = hashlib.sha256("\n".join(f"{it.img_id}\t{it.path}" for it in items).encode()).hexdigest()
    return dict(index=str(index_dir), index_updated=m.updated, model_fingerprint=m.model_fingerprint,
                search_k=search_k, verify_k=verify_k, keep_global=keep_global, queries_sha256=h, n_queries=len(items))


def query_candidates_on_ray(index_dir, items, out_dir, search_k: int, verify_k: int, ray_opts: RayOptions,
                            shard_size: int = 64, progress: bool = True, log=print, keep_global: bool = True,
                            local_top_k: int = 100) -> QueryCandidates:
    """Stage 1 of the bench for ``items`` on Ray workers, resumable; the finished record in query order."""
    index_dir = Path(index_dir).resolve()
    shards_dir = Path(out_dir).resolve() / SHARDS
    state = dict(_state(index_dir, items, search_k, verify_k, keep_global), local_top_k=int(local_top_k))
    dim = int(read_manifest(index_dir).global_dim) if keep_global else 0
    state_file = shards_dir / "state.json"
    if state_file.exists():
        try:
            old = json.loads(state_file.read_text())
        except ValueError:
            old = None
        if old != state:
            log(f"{shards_dir} holds query shards of another run (index, queries or top-k changed): starting over")
            shutil.rmtree(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    if not state_file.exists():
        write_atomic(state_file, json.dumps(state, indent=2))

    parts = []
    for p in sorted(shards_dir.glob("part-*.npz")):
        try:
            parts.append(QueryCandidates.load(p))
        except Exception:  # noqa: BLE001 - a damaged shard is redone
            p.unlink(missing_ok=True)
    done = {str(int(i)) for q in parts for i in q.positions} | {str(f[0]) for q in parts for f in q.failed}
    keys = [str(i) for i in range(len(items))]
    runs = shard_runs(keys, set(keys) - done, done, shard_size)
    if done:
        log(f"resuming: {len(done)} queries already done in {shards_dir}, {sum(map(len, runs))} to go")
    next_part = max([int(p.name[5:10]) for p in shards_dir.glob("part-*.npz")], default=-1) + 1
    if runs:
        with ray_session(ray_opts, log) as ray:
            plan = plan_workers(ray_opts, ray.cluster_resources()).at_most(len(runs))
            t0 = time.perf_counter()
            actors, start, where = start_actors(
                ray, QueryWorker, plan, ray_opts.max_retries, (str(index_dir), plan.threads, int(local_top_k)),
                (str(shards_dir), str(items[int(runs[0][0])].path)),
            )
            hosts = sorted({w["host"] for w in where})
            log(f"{plan.workers} Ray workers ready on {', '.join(hosts)} in {time.perf_counter() - t0:.1f} s; "
                f"{len(runs)} query shards")
            failed_shards: list[QueryCandidates] = []

            def on_failed(number, run, reason):
                log(reason)
                failed_shards.append(_all_failed([int(k) for k in run], reason, state, dim))

            run_shards(
                ray, actors, start, [(next_part + i, run) for i, run in enumerate(runs)],
                lambda a, number, run: a.run_shard.remote(
                    str(shards_dir), number, [(int(k), str(items[int(k)].path)) for k in run], search_k, verify_k,
                    plan.threads, keep_global),
                lambda number, run, out: parts.append(QueryCandidates.load(shards_dir / f"part-{number:05d}.npz")),
                on_failed, progress="query (ray)" if progress else False,
            )
            parts.extend(failed_shards)
    return QueryCandidates.concat(parts)


def _all_failed(positions: list[int], reason: str, state: dict, dim: int) -> QueryCandidates:
    import numpy as np

    n0 = np.zeros(0)
    return QueryCandidates(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros((0, state["search_k"]), np.int64),
                           np.zeros((0, state["search_k"]), np.float32), np.zeros((0, state["verify_k"]), np.int32),
                           n0, n0, n0, [(p, reason) for p in positions])


def remove_shards(out_dir) -> None:
    """Called once the bench's report is written: the shards are no longer needed."""
    shutil.rmtree(Path(out_dir) / SHARDS, ignore_errors=True)

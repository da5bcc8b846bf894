"""Ray plumbing shared by ``index build --ray`` and ``bench --ray``: the cluster, the workers, the shards.

* :func:`ray_session`: without an address, a local Ray cluster on this machine, stopped at the
  end; with one (``HOST:PORT`` or ``auto``), a connection to that cluster. A session that is
  already open (a test's, a notebook's) is reused and left open. Ray's own INFO and WARNING lines
  ("Started a local Ray instance", "Token authentication is enabled") and its workers' output are
  kept off the terminal (they stay in the session's log files) unless ``DELG_GEO_RAY_LOGS=1``.
* :func:`plan_workers`: how many actors, and each one's CPUs and GPUs (``num_gpus`` per actor
  where the cluster has GPUs).
* :func:`shard_runs`: the work cut into shards of consecutive items, never spanning an item an
  earlier (killed) run finished, so finished shards are kept and the rest is redone.
* :func:`run_shards`: one shard per idle actor until all are done; a shard whose actor failed
  (after Ray's retry) is handed to ``on_failed`` with the reason, and its actor replaced.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from delg_geo.core.errors import DelgGeoError

WORKER_LOGS = "/tmp/ray/session_latest/logs"


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster for this run and stop it after
    workers: int | None = None  # default: one per GPU where the cluster has GPUs, else one per CPU
    num_cpus: int | None = None  # a local cluster's CPUs (default: this machine's)
    gpus_per_worker: float | None = None  # default: the cluster's GPUs shared among the workers
    max_retries: int = 1  # a shard whose worker died is retried this often before it is listed as failed


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int  # work in flight inside one worker (batches, verification threads)

    def to_dict(self) -> dict:
        return dict(workers=self.workers, cpus_per_worker=self.cpus_per_worker, gpus_per_worker=self.gpus_per_worker)

    def at_most(self, workers: int) -> "WorkerPlan":
        return WorkerPlan(max(1, min(self.workers, workers)), self.cpus_per_worker, self.gpus_per_worker, self.threads)

    def actor_options(self, max_retries: int) -> dict:
        return dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                    max_restarts=max_retries, max_task_retries=max_retries)


def plan_workers(opts: RayOptions, resources: dict) -> WorkerPlan:
    """Workers and each one's CPUs/GPUs from the cluster's resources."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    workers = opts.workers or (int(gpus) if gpus >= 1 else max(1, int(cpus)))
    if workers < 1:
        raise DelgGeoError(f"--workers must be at least 1 (got {workers})")
    cpu_each = cpus / workers
    cpu_each = float(math.floor(cpu_each)) if cpu_each >= 1 else round(cpu_each, 3)
    if opts.gpus_per_worker is not None:
        gpu_each = float(opts.gpus_per_worker)
    else:
        gpu_each = min(1.0, round(gpus / workers, 3)) if gpus > 0 else 0.0
    return WorkerPlan(workers, cpu_each, gpu_each, max(1, int(round(cpu_each))))


@contextlib.contextmanager
def ray_session(opts: RayOptions, log=print):
    """Connect to ``opts.address``, or start a local cluster; a session already open is reused."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a dependency
        raise DelgGeoError("--ray needs the `ray` package: pip install ray") from e
    if ray.is_initialized():
        yield ray
        return
    if opts.address:
        log(f"connecting to the Ray cluster at {opts.address}")
        ray.init(address=opts.address, **ray_log_options())
    else:
        from delg_geo.core.runtime import available_cpus

        n = opts.num_cpus or available_cpus()
        log(f"starting a local Ray cluster with {n} CPUs (workers' logs: {WORKER_LOGS})")
        ray.init(num_cpus=n, include_dashboard=False, **ray_log_options())
    try:
        yield ray
    finally:
        ray.shutdown()  # stops a local cluster; only disconnects from a remote one


def ray_log_options() -> dict:
    """``ray.init`` options for its logging: errors only on the terminal, the workers' output
    left in their log files; with ``DELG_GEO_RAY_LOGS=1`` Ray's own defaults (INFO, and the
    workers' output forwarded)."""
    import logging

    if os.environ.get("DELG_GEO_RAY_LOGS", "").strip().lower() in ("1", "true", "yes"):
        return dict(log_to_driver=True, logging_level=logging.INFO)
    return dict(log_to_driver=False, logging_level=logging.ERROR)


def check_shared(host: str, must_exist: list[tuple[str | None, str]]) -> None:
    """Raise, naming the node, when a path the work needs is not visible from it."""
    for path, what in must_exist:
        if path and not Path(path).exists():
            raise DelgGeoError(
                f"worker on {host} cannot see {path}: {what} must be on storage every Ray node sees (the same path on each)"
            )


def start_actors(ray, cls, plan: WorkerPlan, max_retries: int, args: tuple, ready_args: tuple):
    """``plan.workers`` actors of ``cls``, each checked with ``ready(*ready_args)``.

    Returns (actors, a function that starts one more, the ``ready`` answers). A worker that
    cannot start (no model, no shared storage) stops the work with its reason.
    """
    Actor = ray.remote(**plan.actor_options(max_retries))(cls)

    def start():
        return Actor.remote(*args)

    actors = [start() for _ in range(plan.workers)]
    try:
        where = ray.get([a.ready.remote(*ready_args) for a in actors])
    except Exception as e:  # noqa: BLE001
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        raise DelgGeoError(f"a Ray worker could not start: {first_line(e)}") from None
    return actors, start, where


def shard_runs(keys_in_order: list[str], todo_keys: set[str], done: set[str], size: int) -> list[list[str]]:
    """Shards of the keys to do: runs of at most ``size``, consecutive in ``keys_in_order``.

    A run never spans a key an earlier run finished (``done``), so every shard holds keys in
    order and finished shards sort into that order by their first key. Keys neither to do nor
    done (failed earlier, listed already) are passed over without cutting the run.
    """
    runs, cur = [], []
    for k in keys_in_order:
        if k in done:
            if cur:
                runs.append(cur)
                cur = []
            continue
        if k not in todo_keys:
            continue
        cur.append(k)
        if len(cur) >= size:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def run_shards(
    ray,
    actors: list,
    start: Callable,
    shards: list[tuple[int, list]],
    submit: Callable,
    on_done: Callable,
    on_failed: Callable,
    progress: str | bool = False,
) -> int:
    """Run ``submit(actor, number, shard)`` for every (number, shard) on the idle actors.

    ``on_done(number, shard, result)`` or ``on_failed(number, shard, reason)`` is called on the
    driver as each finishes. Returns how many shards failed.
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s) for _, s in shards), desc=progress if isinstance(progress, str) else "ray", unit="img")
    queue = list(shards)[::-1]
    inflight: dict = {}
    idle = list(actors)
    failures = 0
    try:
        while queue or inflight:
            while idle and queue:
                number, shard = queue.pop()
                actor = idle.pop()
                inflight[submit(actor, number, shard)] = (actor, number, shard)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, number, shard = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the shard is listed, item by item, with the reason
                failures += 1
                on_failed(number, shard, f"shard {number} failed on Ray: {first_line(e)}")
                if isinstance(e, ray.exceptions.RayActorError):
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    actor = start()
            else:
                on_done(number, shard, out)
            idle.append(actor)
            if bar is not None:
                bar.update(len(shard))
    finally:
        if bar is not None:
            bar.close()
        for a in idle + [v[0] for v in inflight.values()]:
            with contextlib.suppress(Exception):
                ray.kill(a)
    return failures


def first_line(e: BaseException) -> str:
    """The root cause of a Ray error, on one line."""
    cause = getattr(e, "cause", None) or e
    text = [t.strip() for t in str(cause).strip().splitlines() if t.strip()]
    msg = text[-1] if text else ""
    if len(msg) > 200 and ". " in msg[40:]:  # Ray's own messages run on: their first sentence
        msg = msg[: msg.index(". ", 40) + 1]
    name = type(cause).__name__
    return msg if msg.startswith(name) else f"{name}: {msg}" if msg else name

"""Feature extraction on Ray workers, for builds beyond one machine (``index build --ray``).

:func:`index_builder.build.build_index` does everything before and after extraction (reading
the metadata, the resume state, the final assembly), so a Ray build and a single-process build
share that code. Here only the middle differs:

* **Workers.** One Ray actor per worker loads the model once (and a GPU where Ray sees one:
  ``num_gpus`` per actor), then extracts one shard after another.
* **Shards.** A shard is a run of at most ``part_size`` images, consecutive in the metadata's
  order. Its worker writes it as ``INDEX_DIR/.building/parts/part-NNNNN.npz`` (temporary file
  renamed into place), the very checkpoint a single-process build writes. So a killed build
  resumes shard by shard (``--resume``, with or without ``--ray``), and the index folder must be
  on storage that every node sees.
* **Failures.** An image that cannot be read, or every image of a shard whose worker failed
  (after Ray's retry), is listed in ``.building/failed.jsonl`` with the reason, and so in the
  index's ``skipped.csv`` and manifest; never dropped.
* **The cluster.** Without an address a local Ray cluster starts on this machine and stops at the
  end; with one (``--ray-address HOST:PORT`` or ``auto``), the build connects to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from delg_geo.errors import DelgGeoError


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster for this run and stop it after
    workers: int | None = None  # default: one per GPU where the cluster has GPUs, else one per CPU
    num_cpus: int | None = None  # a local cluster's CPUs (default: this machine's)
    gpus_per_worker: float | None = None  # default: the cluster's GPUs shared among the workers
    max_retries: int = 1  # a shard whose worker died is retried this often before it is listed as failed


@dataclass(frozen=True)
class ModelSpec:
    """How a worker re-creates the driver's extractor (checked by fingerprint)."""

    name: str | None
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: str | None, extractor) -> "ModelSpec":
        from delg_geo.models import DEFAULT_MODEL

        config = getattr(extractor, "config", None)
        if getattr(extractor, "model_id", None) == DEFAULT_MODEL and config is not None:
            return cls(DEFAULT_MODEL, {"config": config})
        return cls(model or getattr(extractor, "model_id", None))


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int  # batches in flight per worker (iter_extract's net_workers)

    def to_dict(self) -> dict:
        return dict(workers=self.workers, cpus_per_worker=self.cpus_per_worker, gpus_per_worker=self.gpus_per_worker)


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
        ray.init(address=opts.address, log_to_driver=False)
    else:
        n = opts.num_cpus or os.cpu_count() or 1
        log(f"starting a local Ray cluster with {n} CPUs")
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)  # workers' logs: /tmp/ray/session_latest/logs
    try:
        yield ray
    finally:
        ray.shutdown()  # stops a local cluster; only disconnects from a remote one


class ExtractWorker:
    """A Ray actor (wrapped by :func:`_actor_class`): one model, many shards."""

    def __init__(self, spec: ModelSpec, fingerprint: str, batch_size: int, threads: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from delg_geo.models import get_extractor
        from delg_geo.runtime import configure_for_throughput

        configure_for_throughput()
        self.extractor = get_extractor(spec.name, **spec.options)
        if self.extractor.fingerprint != fingerprint:
            raise DelgGeoError(
                f"worker on {socket.gethostname()}: model {spec.name!r} has fingerprint "
                f"{self.extractor.fingerprint[:12]}, the build expects {fingerprint[:12]} (same weights on every node?)"
            )
        self.batch_size = batch_size
        self.threads = threads

    def ready(self, building_dir: str, probe_image: str | None) -> dict:
        """Check this node sees the build folder and the images; say where it runs."""
        host = socket.gethostname()
        if not (Path(building_dir) / "state.json").exists():
            raise DelgGeoError(
                f"worker on {host} cannot see {building_dir}/state.json: the index folder must be on "
                "storage every Ray node sees (the same path on each)"
            )
        if probe_image and not Path(probe_image).exists():
            raise DelgGeoError(f"worker on {host} cannot see {probe_image}: the images must be on shared storage")
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return dict(host=host, pid=os.getpid(), cuda_visible_devices=gpus)

    def extract_shard(self, index_dir: str, number: int, items: list[tuple[str, str]]) -> dict:
        """Extract ``items`` ((key, path) pairs) and write them as part ``number``."""
        from delg_geo.extract import iter_extract
        from index_builder.build import _write_part

        t0 = time.perf_counter()
        rows, failures = [], []
        for res in iter_extract([p for _, p in items], self.extractor, batch_size=self.batch_size,
                                workers=2, net_workers=self.threads):
            key = items[res.index][0]
            if res.ok:
                rows.append(dict(key=key, features=res.features))
            else:
                failures.append((key, res.error))
        if rows:
            _write_part(Path(index_dir), number, rows)
        return dict(number=number, written=len(rows), failures=failures, seconds=time.perf_counter() - t0,
                    host=socket.gethostname())


def shard_runs(keys_in_order: list[str], todo_keys: set[str], done: set[str], part_size: int) -> list[list[str]]:
    """Shards of the keys to extract: runs of at most ``part_size``, consecutive in metadata order.

    A run never spans an image that an earlier run already checkpointed, so every part holds
    images in metadata order and the parts sort into that order by their first image.
    """
    runs, cur = [], []
    for k in keys_in_order:
        if k in done:
            if cur:
                runs.append(cur)
                cur = []
            continue
        if k not in todo_keys:  # failed earlier: listed already, not a gap
            continue
        cur.append(k)
        if len(cur) >= part_size:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _actor_class(ray, plan: WorkerPlan, max_retries: int):
    return ray.remote(
        num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker,
        max_restarts=max_retries, max_task_retries=max_retries,
    )(ExtractWorker)


def extract_on_ray(index_dir, keys_in_order, todo, done, next_part, model, extractor, opts, ray_opts: RayOptions,
                   record_failure, log) -> tuple[int, dict]:
    """Extract ``todo`` ((key, record) pairs) on Ray workers into checkpoint parts.

    Returns (images written, a description of the run). ``record_failure(key, reason)`` lists
    an image that failed. Called by :func:`index_builder.build.build_index`.
    """
    index_dir = Path(index_dir).resolve()
    paths = {k: str(Path(r.path).resolve()) for k, r in todo}
    runs = shard_runs(keys_in_order, set(paths), set(done), opts.part_size)
    info = dict(address=ray_opts.address or "local", shards=len(runs), failed_shards=0)
    if not runs:
        return 0, info
    spec = ModelSpec.of(model, extractor)
    t0 = time.perf_counter()
    with ray_session(ray_opts, log) as ray:
        plan = plan_workers(ray_opts, ray.cluster_resources())
        plan = WorkerPlan(min(plan.workers, len(runs)), plan.cpus_per_worker, plan.gpus_per_worker, plan.threads)
        info.update(plan.to_dict())
        Actor = _actor_class(ray, plan, ray_opts.max_retries)

        def start():
            return Actor.remote(spec, extractor.fingerprint, opts.batch_size, plan.threads)

        actors = [start() for _ in range(plan.workers)]
        probe = paths[runs[0][0]]
        try:
            where = ray.get([a.ready.remote(str(index_dir / ".building"), probe) for a in actors])
        except Exception as e:  # noqa: BLE001 - a worker that cannot start stops the build, clearly
            raise DelgGeoError(f"a Ray worker could not start: {_first_line(e)}") from None
        info["hosts"] = sorted({w["host"] for w in where})
        info["startup_s"] = round(time.perf_counter() - t0, 2)
        log(f"{plan.workers} Ray workers ready on {', '.join(info['hosts'])} "
            f"({plan.cpus_per_worker:g} CPU, {plan.gpus_per_worker:g} GPU each); {len(runs)} shards to extract")
        t1 = time.perf_counter()
        written = _run_shards(ray, actors, start, runs, paths, index_dir, next_part, record_failure, info, opts.progress, log)
        info["extract_s"] = round(time.perf_counter() - t1, 2)
        for a in actors:
            ray.kill(a)
    return written, info


def _run_shards(ray, actors, start, runs, paths, index_dir, next_part, record_failure, info, progress, log) -> int:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(r) for r in runs), desc="index (ray)", unit="img")
    queue = list(enumerate(runs))[::-1]
    inflight: dict = {}
    idle = list(actors)
    written = 0
    try:
        while queue or inflight:
            while idle and queue:
                i, run = queue.pop()
                actor = idle.pop()
                ref = actor.extract_shard.remote(str(index_dir), next_part + i, [(k, paths[k]) for k in run])
                inflight[ref] = (actor, i, run)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, i, run = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the shard is listed, image by image, with the reason
                info["failed_shards"] += 1
                reason = f"shard {next_part + i} failed on Ray: {_first_line(e)}"
                log(reason)
                for k in run:
                    record_failure(k, reason)
                if isinstance(e, ray.exceptions.RayActorError):
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    actor = start()
            else:
                written += out["written"]
                for k, reason in out["failures"]:
                    record_failure(k, reason)
            idle.append(actor)
            if bar is not None:
                bar.update(len(run))
    except KeyboardInterrupt:
        raise DelgGeoError(
            f"interrupted: finished shards are checkpointed in {index_dir / '.building'}; "
            "continue with the same command and --resume"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return written


def _first_line(e: BaseException) -> str:
    """The root cause of a Ray error, on one line."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    msg = next((t for t in reversed(text) if t.strip()), type(cause).__name__)
    return f"{type(cause).__name__}: {msg.strip()}" if not msg.startswith(type(cause).__name__) else msg.strip()

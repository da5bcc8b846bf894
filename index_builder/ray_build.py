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
* **The cluster** (:mod:`delg_geo.core.ray_pool`): without an address a local Ray cluster starts on
  this machine and stops at the end; with one (``--ray-address HOST:PORT``), the build connects.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.ray_pool import RayOptions, check_shared, plan_workers, ray_session, run_shards, shard_runs, start_actors

__all__ = ["RayOptions", "ModelSpec", "ExtractWorker", "extract_on_ray"]


@dataclass(frozen=True)
class ModelSpec:
    """How a worker re-creates the driver's extractor (checked by fingerprint)."""

    name: str | None
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: str | None, extractor) -> "ModelSpec":
        from delg_geo.features.models import DEFAULT_MODEL

        config = getattr(extractor, "config", None)
        local = getattr(extractor, "local_features", "delg")
        options = {} if local == "delg" else {"local": local, "local_options": dict(extractor.local_config)}
        if getattr(extractor, "model_id", None) == DEFAULT_MODEL and config is not None:
            return cls(DEFAULT_MODEL, {"config": config, **options})
        return cls(model or getattr(extractor, "model_id", None), options)


class ExtractWorker:
    """A Ray actor: one model, many shards."""

    def __init__(self, spec: ModelSpec, fingerprint: str, batch_size: int, threads: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from delg_geo.core.memory import keep_freed_memory
        from delg_geo.features.models import get_extractor
        from delg_geo.core.runtime import configure_for_throughput

        keep_freed_memory()
        configure_for_throughput(threads)  # the actor's num_cpus, not the node's cores
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
        check_shared(host, [(f"{building_dir}/state.json", "the index folder"), (probe_image, "the images")])
        return dict(host=host, pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    def extract_shard(self, index_dir: str, number: int, items: list[tuple[str, str]], max_local: int | None = None) -> dict:
        """Extract ``items`` ((key, path) pairs) and write them as part ``number``."""
        from delg_geo.features.extract import iter_extract
        from index_builder.parts import _write_part

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
            _write_part(Path(index_dir), number, rows, self.extractor, max_local)
        return dict(number=number, written=len(rows), failures=failures, seconds=time.perf_counter() - t0,
                    host=socket.gethostname())


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
    written = 0

    def on_done(number, run, out):
        nonlocal written
        written += out["written"]
        for k, reason in out["failures"]:
            record_failure(k, reason)

    def on_failed(number, run, reason):
        log(reason)
        for k in run:
            record_failure(k, reason)

    with ray_session(ray_opts, log) as ray:
        plan = plan_workers(ray_opts, ray.cluster_resources()).at_most(len(runs))
        info.update(plan.to_dict())
        actors, start, where = start_actors(
            ray, ExtractWorker, plan, ray_opts.max_retries, (spec, extractor.fingerprint, opts.batch_size, plan.threads),
            (str(index_dir / ".building"), paths[runs[0][0]]),
        )
        info["hosts"] = sorted({w["host"] for w in where})
        info["startup_s"] = round(time.perf_counter() - t0, 2)
        log(f"{plan.workers} Ray workers ready on {', '.join(info['hosts'])} "
            f"({plan.cpus_per_worker:g} CPU, {plan.gpus_per_worker:g} GPU each); {len(runs)} shards to extract")
        t1 = time.perf_counter()
        try:
            info["failed_shards"] = run_shards(
                ray, actors, start, [(next_part + i, run) for i, run in enumerate(runs)],
                lambda a, number, run: a.extract_shard.remote(str(index_dir), number, [(k, paths[k]) for k in run],
                                                                     opts.compact.max_local),
                on_done, on_failed, progress="index (ray)" if opts.progress else False,
            )
        except KeyboardInterrupt:
            raise DelgGeoError(
                f"interrupted: finished shards are checkpointed in {index_dir / '.building'}; "
                "continue with the same command and --resume"
            ) from None
        info["extract_s"] = round(time.perf_counter() - t1, 2)
    return written, info

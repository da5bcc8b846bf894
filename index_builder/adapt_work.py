"""The sharded work of ``index adapt``: mining the index and re-extracting its global vectors,
in one process or on Ray actors (the build's plumbing, :mod:`delg_geo.core.ray_pool`).

Work is cut into shards of consecutive ids; each finished shard is written atomically as
``INDEX_DIR/.adapt/<stage>/shard-NNNNN.npz`` by the driver, so a killed run keeps the finished
shards and a rerun does only the rest. A shard's contents depend only on its ids, never on which
process ran it: Ray and one process write the same files.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from delg_geo.core.errors import DelgGeoError
from index_builder.work import _kill_point


@dataclass(frozen=True)
class Shard:
    number: int
    ids: np.ndarray  # int64

    def path(self, folder: Path) -> Path:
        return folder / f"shard-{self.number:05d}.npz"


def plan_shards(ids: np.ndarray, size: int) -> list[Shard]:
    ids = np.asarray(ids, np.int64)
    return [Shard(k, ids[a : a + size]) for k, a in enumerate(range(0, len(ids), size))]


def _done(shard: Shard, folder: Path) -> bool:
    p = shard.path(folder)
    if not p.exists():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            ok = np.array_equal(z["shard_ids"], shard.ids)
    except Exception:  # noqa: BLE001 - damaged: done again
        ok = False
    if not ok:
        p.unlink(missing_ok=True)
    return ok


def _write(shard: Shard, folder: Path, arrays: dict, kill: str) -> None:
    tmp = folder / f".shard-{shard.number:05d}.tmp.npz"
    np.savez(tmp, shard_ids=shard.ids, **arrays)
    os.replace(tmp, shard.path(folder))
    _kill_point(kill)


def run_shards_here_or_on_ray(folder: Path, shards: list[Shard], local: Callable[[Shard], dict], actor_cls, actor_args: tuple,
                              method: str, ray_opts, label: str, kill: str, progress=False, log=print) -> dict:
    """Run every shard not done yet: ``local(shard) -> arrays`` here, or ``actor.METHOD(ids)``
    on Ray actors of ``actor_cls(*actor_args)``; write each result as the shard's file."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not _done(s, folder)]
    info = dict(shards=len(shards), resumed=len(shards) - len(todo), ray=ray_opts is not None)
    if not todo:
        return info
    t0 = time.perf_counter()
    if ray_opts is None:
        from delg_geo.core.progress import progress_bar

        bar = progress_bar(sum(len(s.ids) for s in todo), label, bool(progress), unit="img")
        for s in todo:
            _write(s, folder, local(s), kill)
            bar.update(len(s.ids))
        bar.close()
    else:
        info.update(_on_ray(folder, todo, actor_cls, actor_args, method, ray_opts, label, kill, progress, log))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _on_ray(folder, todo, actor_cls, actor_args, method, ray_opts, label, kill, progress, log) -> dict:
    from delg_geo.core.ray_pool import plan_workers, ray_session, run_shards, start_actors

    by_number = {s.number: s for s in todo}
    failed: list[str] = []

    def on_done(number, ids, out):
        _write(by_number[number], folder, out, kill)

    def on_failed(number, ids, reason):
        failed.append(reason)

    with ray_session(ray_opts, log) as ray:
        plan = plan_workers(ray_opts, ray.cluster_resources()).at_most(len(todo))
        actors, start, where = start_actors(ray, actor_cls, plan, ray_opts.max_retries, actor_args, (str(folder),))
        log(f"{plan.workers} Ray workers on {', '.join(sorted({w['host'] for w in where}))}; {len(todo)} shards ({label})")
        run_shards(ray, actors, start, [(s.number, list(map(int, s.ids))) for s in todo],
                   lambda a, number, ids: getattr(a, method).remote(ids), on_done, on_failed,
                   progress=f"{label} (ray)" if progress else False)
    if failed:
        raise DelgGeoError(f"{len(failed)} shard(s) failed on Ray ({failed[0]}); run the command again to redo them")
    return dict(workers=plan.workers, hosts=sorted({w["host"] for w in where}))


def load_shards(folder: Path, shards: list[Shard]) -> list[dict]:
    out = []
    for s in shards:
        with np.load(s.path(folder), allow_pickle=False) as z:
            out.append({k: z[k] for k in z.files})
    return out


# -- mining ---------------------------------------------------------------------------------------

def mine_shard(index, ids, cfg, keys, workers: int = 2) -> dict:
    from dataclasses import asdict

    from delg_geo.retrieval.mining import mine_photos

    return asdict(mine_photos(index, ids, cfg, keys=keys, workers=workers))


class MineWorker:
    """A Ray actor: opens the index once, mines shard after shard."""

    def __init__(self, index_dir: str, cfg, threads: int = 1):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from delg_geo.index.geo_index import GeoIndex
        from delg_geo.retrieval.calibrate import photo_keys

        self.index = GeoIndex(index_dir, device="cpu")
        self.keys = photo_keys(self.index.metadata)
        self.cfg = cfg
        self.threads = threads

    def ready(self, folder: str) -> dict:
        from delg_geo.core.ray_pool import check_shared

        check_shared(socket.gethostname(), [(folder, "the index folder")])
        return dict(host=socket.gethostname(), pid=os.getpid())

    def mine(self, ids: list[int]) -> dict:
        return mine_shard(self.index, np.asarray(ids, np.int64), self.cfg, self.keys, self.threads)


# -- re-extraction of the global descriptors -----------------------------------------------------

def extract_globals(extractor, paths: list[str], batch_size: int = 4, net_workers: int | None = None) -> dict:
    """Raw global descriptors of ``paths`` (in order); a photo that fails stops the work, naming it."""
    from delg_geo.features.extract import iter_extract

    out = np.zeros((len(paths), extractor.global_dim), np.float32)
    for res in iter_extract(paths, extractor, batch_size=batch_size, net_workers=net_workers):
        if not res.ok:
            raise DelgGeoError(f"cannot re-extract the global descriptor of an indexed photo: {res.error}; "
                               "restore it, or adapt with --kind projection (no re-extraction)")
        out[res.index] = res.features.global_descriptor
    return dict(global_raw=out)


class GlobalWorker:
    """A Ray actor: the adapted model, loaded once, re-extracts shard after shard."""

    def __init__(self, index_dir: str, name: str, options: dict, fingerprint: str, threads: int = 1):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import pandas as pd

        from delg_geo.core.runtime import configure_for_throughput
        from delg_geo.features.models import get_extractor

        configure_for_throughput()
        paths = pd.read_csv(Path(index_dir) / "metadata.csv", usecols=["path"], keep_default_na=False)["path"]
        self.extractor = get_extractor(name, **options)
        if self.extractor.fingerprint != fingerprint:
            raise DelgGeoError(f"worker on {socket.gethostname()}: the adapted model has fingerprint "
                               f"{self.extractor.fingerprint[:12]}, the driver's {fingerprint[:12]}")
        self.paths = paths.astype(str).tolist()
        self.threads = threads

    def ready(self, folder: str) -> dict:
        from delg_geo.core.ray_pool import check_shared

        probe = self.paths[0] if self.paths else None
        check_shared(socket.gethostname(), [(folder, "the index folder"), (probe, "the images")])
        return dict(host=socket.gethostname(), pid=os.getpid())

    def extract(self, ids: list[int]) -> dict:
        return extract_globals(self.extractor, [self.paths[int(i)] for i in ids], net_workers=self.threads)

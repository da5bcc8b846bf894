"""``delg-geo index adapt``: learn a collection-specific global descriptor from an index's own
photos and geotags, then rebuild what depends on it.

1. **Mine** (:mod:`delg_geo.retrieval.mining`): each mined photo's shortlist, as a query gets it,
   verified with the stored local features: positive pairs, places, hard negatives. Sharded and
   resumable (``.adapt/mining``), in one process or on Ray (``--ray``).
2. **Train** (:mod:`index_builder.adapt_train`): ``finetune`` for the embedded default model
   (the last block, the head, GeM ``p`` and a projection, over cached activations of the frozen
   blocks) or ``projection`` for any model (a linear map of the stored whitened vectors). The
   epoch is chosen on held-out self-queries, the unadapted descriptor included.
3. **Rebuild** (:mod:`index_builder.adapt_stage`): re-extract the global descriptors with the
   adapted model (``finetune``; sharded, resumable, on Ray with ``--ray``), whiten them (the
   learned projection or a PCA refit, whichever finds more held-out self-queries' right photos),
   stage the next version of the index with the weights in ``adapt.npz``, calibrate it, and move
   it into place. A descriptor that does worse than the index's own on the held-out self-queries
   is not installed (the report says so). Descriptors are compared by the mean of the held-out
   self-queries' recall at 1, 10 and 100 (:func:`summary`).

Everything before the move happens in ``INDEX_DIR/.adapt``; the index is untouched until then, and
a rerun with the same settings resumes where a killed run stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.index.geo_index import MANIFEST, GeoIndex, now_iso, read_manifest, write_atomic
from delg_geo.retrieval.mining import MIN_PLACES, MiningConfig
from index_builder.adapt_train import TrainConfig
from index_builder.work import _kill_point

WORK = ".adapt"
MAX_MINED = 50_000  # photos mined by default; --sample sets another number
WHITENING_MIN_IMAGES = 100  # as the build: fewer photos are searched unwhitened


@dataclass
class AdaptOptions:
    epochs: int = 3
    sample: int | None = None  # photos mined (None: all, up to MAX_MINED)
    kind: str | None = None  # finetune | projection (None: finetune for the default model)
    min_places: int = MIN_PLACES
    mining: MiningConfig = field(default_factory=MiningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    first_block: int = 15  # finetune: blocks from this one to the head are trained
    train_side: int = 512  # finetune: photos are cached at most this large
    whitened: bool = False  # finetune: train through a projection of the index's whitening (else raw GeM, PCA after)
    shard_size: int = 64
    workers: int = 2  # verification threads when mining in this process
    batch_size: int = 4
    progress: bool = True

    def settings(self) -> dict:
        """What a rerun must share with the interrupted run to resume it."""
        d = asdict(self)
        for k in ("progress", "workers", "batch_size", "min_places"):
            d.pop(k)
        d["train"] = replace(self.train, epochs=self.epochs).to_dict()
        return json.loads(json.dumps(d, default=str))


@dataclass
class AdaptReport:
    index_dir: str
    kind: str
    installed: bool  # False: the adapted descriptor did no better on held-out self-queries
    mined: dict
    epochs: list  # per epoch: loss, held-out recall (at the training scale)
    chosen_epoch: int
    selfquery: dict  # before / after: held-out self-query recall of the index's vectors
    whitening: str
    seconds: dict
    resumed: dict
    calibration: dict | None = None
    ray: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def adapt_index(index_dir: str | Path, options: AdaptOptions | None = None, ray=None, log=print) -> AdaptReport:
    """Adapt the index at ``index_dir`` (see the module docstring). ``ray``: a
    :class:`delg_geo.core.ray_pool.RayOptions` to mine and re-extract on Ray."""
    from delg_geo.index.lock import writer_lock

    index_dir = Path(index_dir)
    if not (index_dir / WORK / "next" / MANIFEST).exists():
        read_manifest(index_dir)  # no index: refused before the lock creates anything
    with writer_lock(index_dir, "delg-geo index adapt"):
        return _adapt(index_dir, options or AdaptOptions(), ray, log)


def _state(work: Path) -> dict | None:
    try:
        d = json.loads((work / "state.json").read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _save_state(work: Path, state: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(work / "state.json", json.dumps(state, indent=1))


def _finish_interrupted(index_dir: Path, work: Path, log) -> AdaptReport | None:
    """A run that had staged (or moved in) the next version: finish it."""
    from index_builder.adapt_stage import commit

    state = _state(work)
    if not state or state.get("stage") != "staged":
        return None
    nxt = work / "next"
    have = (index_dir / MANIFEST).exists()
    current = json.loads((index_dir / MANIFEST).read_text()).get("updated") if have else None
    if current == state.get("staged_updated"):  # already in place: only the work folder was left
        shutil.rmtree(work, ignore_errors=True)
    elif (nxt / MANIFEST).exists() and (not have or current == state.get("index_updated")):
        log(f"adapt: finishing the interrupted move of the adapted index into {index_dir}")
        commit(index_dir, nxt, work)
    else:
        return None
    return AdaptReport(**state["report"])


def _mining_key(settings: dict) -> list:
    return [settings.get(k) for k in ("sample", "mining", "shard_size")] + [settings.get("train", {}).get("seed")]


def _reuse(work: Path, state: dict | None, settings: dict, updated: str, log) -> dict:
    """The work folder's state for this run: an interrupted run of the same index version keeps
    what does not depend on what changed (mining, for other training settings; the cache too when
    the frozen blocks and the photo size are the same); anything else starts over."""
    keep: set[str] = set()
    if state is not None and state.get("index_updated") == updated:
        old = state.get("settings") or {}
        if old == settings:
            keep = {p.name for p in work.iterdir()}
        elif _mining_key(old) == _mining_key(settings):
            keep = {"mining"} | ({"cache"} if [old.get("first_block"), old.get("train_side")] ==
                                 [settings.get("first_block"), settings.get("train_side")] else set())
            log(f"adapt: {work} holds work with other settings; keeping its {' and '.join(sorted(keep))}")
        elif old:
            log(f"adapt: {work} holds work with other settings; starting over")
    elif state is not None:
        log(f"adapt: {work} holds work on another version of the index; starting over")
    if work.exists():
        for p in work.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if state is None or state.get("settings") != settings or state.get("index_updated") != updated:
        state = dict(index_updated=updated, settings=settings, started=now_iso(), stage="mining")
        _save_state(work, state)
    return state


def summary(r: dict) -> float:
    """One number for held-out self-query recall: the mean of recall at 1, 10 and 100 (the global
    answer, a short list, and what verification gets)."""
    return float(np.mean([np.nan_to_num(r.get(k, 0.0)) for k in ("top1", "top10", "top100")]))


def _adapt(index_dir: Path, opts: AdaptOptions, ray, log) -> AdaptReport:
    t_all = time.perf_counter()
    work = index_dir / WORK
    done = _finish_interrupted(index_dir, work, log)
    if done is not None:
        return done
    m = read_manifest(index_dir)
    state = _reuse(work, _state(work), opts.settings(), m.updated, log)
    index = GeoIndex(index_dir, device="cpu")
    kind = opts.kind or ("finetune" if m.model_id == "efficientnet-lite0" else "projection")
    if kind == "finetune" and m.model_id != "efficientnet-lite0":
        raise DelgGeoError(f"{index_dir}: --kind finetune needs the embedded default model; this index was built with "
                           f"{m.model_id!r}: adapt it with --kind projection")
    seconds, resumed = {}, {}
    mined, cfg, keys, ray_info = _mine(index, opts, work, ray, seconds, resumed, log)
    from delg_geo.retrieval.mining import require_places

    require_places(mined, opts.min_places, str(index_dir))
    c = mined.counts()
    log(f"adapt: mined {c['positive_pairs']} verified pairs in {c['places']} places ({c['photos_in_places']} photos), "
        f"{c['hard_negatives']} hard negatives, from {c['mined_photos']} photos")
    from index_builder.adapt_train import split_photos

    split = split_photos(index.lats, index.lons, keys, cfg.radius_km, opts.train.holdout, opts.train.seed,
                         leave_out=cfg.leave_out)
    weights, result = _train(index, kind, opts, mined, split, cfg, work, seconds, resumed, log)
    t = time.perf_counter()
    vectors, raw, whitening, wh_info, fingerprint, choice = _new_vectors(index, weights, split, opts, work, ray, resumed, log)
    seconds["rebuild_vectors"] = round(time.perf_counter() - t, 1)
    from index_builder.adapt_train import recall

    before, after = recall(index.search_vectors(), split), recall(vectors, split)
    installed = summary(after) > summary(before) or (summary(after) == summary(before) and result["chosen_epoch"] > 0)
    report = AdaptReport(
        str(index_dir), kind, installed, c, [dict(epoch=h["epoch"], loss=h["loss"], heldout=h["heldout"]) for h in result["history"]],
        result["chosen_epoch"], dict(before=before, after=after, queries=int(len(split.queries)), in_sample=split.in_sample,
                                     radius_km=cfg.radius_km),
        choice, seconds, resumed, ray=ray_info)
    if not installed:
        log(f"adapt: on {len(split.queries)} held-out self-queries the adapted descriptor's recall at 1/10/100 averages "
            f"{summary(after):.1%}, the index's own {summary(before):.1%}: not installed; the index is unchanged "
            f"(the mined pairs are kept in {work / 'mining'} for another try)")
        for p in work.iterdir():
            if p.is_dir() and p.name != "mining":
                shutil.rmtree(p)
        report.seconds["total"] = round(time.perf_counter() - t_all, 1)
        return report
    return _install(index_dir, index, m, work, state, report, vectors, raw, whitening, wh_info, weights, fingerprint, opts,
                    t_all, log)


def _mine(index, opts: AdaptOptions, work: Path, ray, seconds: dict, resumed: dict, log):
    from delg_geo.retrieval.calibrate import photo_keys
    from delg_geo.retrieval.mining import MinedRows, mined_set, resolve
    from index_builder.adapt_work import MineWorker, load_shards, mine_shard, plan_shards, run_shards_here_or_on_ray

    t = time.perf_counter()
    cfg = resolve(index, opts.mining)
    keys = photo_keys(index.metadata)
    n = len(index)
    want = min(n, opts.sample or MAX_MINED)
    ids = np.arange(n) if want >= n else np.sort(np.random.default_rng(opts.train.seed).choice(n, want, replace=False))
    shards = plan_shards(ids, opts.shard_size)
    info = run_shards_here_or_on_ray(
        work / "mining", shards, lambda s: mine_shard(index, s.ids, cfg, keys, opts.workers), MineWorker,
        (str(index.path), cfg), "mine", ray, "adapt: mine", "adapt-mine", opts.progress, log)
    resumed["mining_shards"] = info["resumed"]
    fields = ("query_ids", "offsets", "ids", "similarities", "inliers")
    rows = MinedRows.concat([MinedRows(**{k: d[k] for k in fields}) for d in load_shards(work / "mining", shards)])
    seconds["mine"] = round(time.perf_counter() - t, 1)
    return mined_set(rows, index.lats, index.lons, cfg), cfg, keys, (info if ray is not None else None)


def _lite_config(m):
    from delg_geo.features.models.lite_delg import LiteDelgConfig

    cfg = dict(m.model_config)
    for k in ("scales", "global_scales"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    return LiteDelgConfig(**cfg)


def _train(index, kind: str, opts: AdaptOptions, mined, split, cfg, work: Path, seconds: dict, resumed: dict, log):
    from delg_geo.index.adapted_file import load_adapted
    from index_builder.adapt_model import FinetuneModel, ProjectionModel, cache_maps
    from index_builder.adapt_train import train

    m = index.manifest
    start = load_adapted(index.path, m)  # an adapted index is adapted again from its own weights
    base_fp = start.base_fingerprint if start is not None else m.model_fingerprint
    t = time.perf_counter()
    if kind == "finetune":
        wh = index.whitening
        model = FinetuneModel(opts.first_block, wh.mean, wh.projection, start=start, whitened=opts.whitened)
        paths = dict(enumerate(index.metadata["path"].astype(str)))
        inputs = cache_maps(paths, opts.first_block, _lite_config(m), opts.train_side, work / "cache",
                            progress=opts.progress, log=log)
    else:
        model = ProjectionModel(m.search_dim)
        g = index.search_vectors()
        inputs = {i: g[i] for i in range(len(g))}
    seconds["prepare"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    tcfg = replace(opts.train, epochs=opts.epochs)
    done_before = len(json.loads((work / "train" / "history.json").read_text())) if (work / "train" / "history.json").exists() else 0
    result = train(model, inputs, mined, split, index.lats, index.lons, cfg.negative_km, tcfg, work / "train",
                   progress=opts.progress, log=log)
    resumed["epochs"] = max(0, done_before - 1)
    seconds["train"] = round(time.perf_counter() - t, 1)
    recipe = dict(kind=kind, epochs=opts.epochs, sample=opts.sample, loss=tcfg.loss, train=tcfg.to_dict(), mining=cfg.to_dict(),
                  mined=mined.counts(), chosen_epoch=result["chosen_epoch"], first_block=opts.first_block,
                  train_side=opts.train_side, anchors=result["anchors"], at=now_iso())
    return model.export(base_fp, recipe), result


def _new_vectors(index, weights, split, opts: AdaptOptions, work: Path, ray, resumed: dict, log):
    """(vectors, raw or None, whitening, its manifest info, model fingerprint, whitening choice)."""
    from delg_geo.features.base import l2_normalize
    from delg_geo.index.whitening import Whitening, fit_pca_whitening
    from index_builder.adapt_train import recall

    m = index.manifest
    if weights.kind == "projection":
        old = index.whitening
        proj = weights.projection if old.projection is None else old.projection @ weights.projection
        wh = Whitening(old.mean, proj.astype(np.float32))
        vectors = l2_normalize(index.search_vectors() @ weights.projection, axis=1)
        return vectors, None, wh, dict(m.whitening, kind="adapted projection", adapted=True), m.model_fingerprint, "projection"
    raw, fingerprint = _reextract(index, weights, opts, work, ray, resumed, log)
    power, shrink = float(m.whitening.get("power", 0.5)), float(m.whitening.get("shrinkage", 0.1))
    take = np.random.default_rng(0).permutation(len(raw))[:50_000]
    pca = fit_pca_whitening(raw[np.sort(take)], dim=m.search_dim, power=power, shrinkage=shrink) \
        if len(raw) >= WHITENING_MIN_IMAGES else Whitening.identity(raw.shape[1])
    candidates = {"pca": pca}
    if weights.projection is not None:  # trained through a projection: it competes with a PCA refit
        candidates["learned"] = Whitening(weights.mean.astype(np.float32), weights.projection.astype(np.float32))
    scores = {name: recall(w.apply(raw), split) for name, w in candidates.items()}
    choice = max(scores, key=lambda k: (summary(scores[k]), k == "learned"))
    log(f"adapt: held-out self-queries by whitening: {scores}: {choice}")
    wh = candidates[choice]
    info = dict(kind="learned projection" if choice == "learned" else m.whitening.get("kind", "pca"), adapted=True,
                dim=wh.out_dim, power=power, shrinkage=shrink, fitted_on=int(len(take)), held_out=scores)
    return wh.apply(raw), raw, wh, info, fingerprint, choice


def _reextract(index, weights, opts: AdaptOptions, work: Path, ray, resumed: dict, log):
    from delg_geo.features.models import get_extractor
    from index_builder.adapt_work import GlobalWorker, extract_globals, load_shards, plan_shards, run_shards_here_or_on_ray

    m = index.manifest
    options = dict(config=_lite_config(m), adapted=weights)
    ext = get_extractor(m.model_id, **options)
    paths = index.metadata["path"].astype(str).tolist()
    shards = plan_shards(np.arange(len(paths)), opts.shard_size)
    info = run_shards_here_or_on_ray(
        work / "extract", shards, lambda s: extract_globals(ext, [paths[i] for i in s.ids], opts.batch_size), GlobalWorker,
        (str(index.path), m.model_id, options, ext.fingerprint), "extract", ray, "adapt: re-extract", "adapt-extract",
        opts.progress, log)
    resumed["extract_shards"] = info["resumed"]
    raw = np.concatenate([d["global_raw"] for d in load_shards(work / "extract", shards)])
    return raw, ext.fingerprint


def _install(index_dir, index, m, work, state, report, vectors, raw, whitening, wh_info, weights, fingerprint, opts, t_all, log):
    from index_builder.adapt_stage import calibrate_next, commit, stage_index

    t = time.perf_counter()
    nxt = work / "next"
    adapt_info = dict(weights.recipe, selfquery=report.selfquery, whitening=report.whitening, installed=now_iso())
    new = stage_index(index_dir, nxt, m, vectors, whitening, wh_info, raw, weights, adapt_info, fingerprint, log=log)
    del index  # its memory maps of the old files
    report.seconds["stage"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    report.calibration = calibrate_next(nxt, m, progress=opts.progress, log=log)
    report.seconds["calibrate"] = round(time.perf_counter() - t, 1)
    report.seconds["total"] = round(time.perf_counter() - t_all, 1)
    state.update(stage="staged", staged_updated=new.updated, report=report.to_dict())
    _save_state(work, state)
    _kill_point("adapt-staged")
    commit(index_dir, nxt, work)
    s = report.selfquery
    log(f"adapt: installed; held-out self-queries' global top 1 {s['before']['top1']:.1%} -> {s['after']['top1']:.1%}, "
        f"top 10 {s['before']['top10']:.1%} -> {s['after']['top10']:.1%} ({s['queries']} queries)")
    return report

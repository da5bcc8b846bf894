"""Stage 6 — evaluate: batch benchmarking of every method on one query set.

Methods (rows of the report):

* ``verified``   the full pipeline: global top-k, local matching, pydegensac re-ranking
* ``global``     the global top-1
* ``knn``        a kernel-density vote over the global top-k neighbours ([L]kNN, Vo et al. 2017)
* ``classifier`` PlaNet/LocationNet: softmax over adaptive S2 cells, the top cell's centre of mass
* ``hybrid``     retrieval restricted to the classifier's top cells
* ``sift``       rootSIFT + pydegensac over the global top-k (the Venice project's method)
* ``oracle``     the reference photo nearest to the truth: the best any retrieval can do
* ``centroid``   the collection's centroid: the floor

With ``verified`` the report also says whether its ``confidence`` means what it says
(:mod:`delg_geo.reliability`): a calibration table, the expected calibration error, the
precision and coverage of answers above 0.5 and 0.8, and ``reliability.png`` beside
``error_cdf.png``.

Query features are extracted once (batched) and shared by the DELG-based methods; each
method's ``seconds`` counts that shared extraction plus its own work. The first stage (extract,
search, verify: :func:`query_candidates`) runs over shards of queries, so memory stays bounded
by a shard; with ``ray`` the shards run on Ray workers (:mod:`delg_geo.ray_bench`) and every
later stage is the same code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DelgGeoError
from .jsonio import json_default
from .evaluate import DEFAULT_RADII_KM, MethodSummary, error_cdf_png, format_table, radius_key, summarize
from .geo import haversine_km, weighted_centroid

ALL_METHODS = ("verified", "global", "knn", "classifier", "hybrid", "sift", "oracle", "centroid")
DEFAULT_METHODS = ALL_METHODS


@dataclass
class BenchConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    radii_km: tuple[float, ...] = DEFAULT_RADII_KM
    top_k: int = 100
    local_top_k: int | None = None  # candidates the index's ASMK inverted file adds for `verified`: None as many as top_k, 0 none
    sift_top_k: int = 100
    knn_sigma_km: float | None = None  # default: from the collection's extent
    hybrid_cells: int = 3
    map: bool = False
    progress: bool = True


@dataclass
class BenchResult:
    out_dir: Path
    summaries: dict[str, MethodSummary]
    predictions: pd.DataFrame
    failed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class QueryCandidates:
    """Stage 1 for a run of queries: global descriptors, candidates and inlier counts.

    Per usable query (in query-file order): its position in the query list, global descriptor,
    candidate ids and similarities (best first, ``-1``/NaN padding past what the index holds),
    the candidates the ASMK inverted file adds (``extra_ids``/``extra_sims``, same padding; no
    columns where the index has none or nothing was verified), inlier counts for the first
    ``verify_k`` candidates then for the extra ones, and its seconds of extraction, search and
    verification. ``failed`` lists the queries whose image could not be used: ``(position, reason)``.
    """

    positions: np.ndarray  # (n,) int64
    global_desc: np.ndarray  # (n, G) float32; (n, 0) where not kept
    ids: np.ndarray  # (n, K) int64
    sims: np.ndarray  # (n, K) float32
    inliers: np.ndarray  # (n, verify_k + L) int32
    extract_s: np.ndarray  # (n,)
    search_s: np.ndarray  # (n,)
    verify_s: np.ndarray  # (n,)
    failed: list = field(default_factory=list)
    extra_ids: np.ndarray | None = None  # (n, L) int64: the ASMK inverted file's additions
    extra_sims: np.ndarray | None = None  # (n, L) float32

    FIELDS = ("positions", "global_desc", "ids", "sims", "inliers", "extract_s", "search_s", "verify_s",
              "extra_ids", "extra_sims")

    def __post_init__(self):
        n = len(self.positions)
        if self.extra_ids is None:
            self.extra_ids = np.full((n, 0), -1, np.int64)
        if self.extra_sims is None:
            self.extra_sims = np.full((n, 0), np.nan, np.float32)

    def save(self, path: Path) -> None:
        """Plain arrays in one ``.npz``, written to a temporary name and renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.FIELDS},
                 failed_pos=np.array([f[0] for f in self.failed], np.int64),
                 failed_reason=np.array([f[1] for f in self.failed], dtype=str))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "QueryCandidates":
        with np.load(path, allow_pickle=False) as z:
            failed = [(int(p), str(r)) for p, r in zip(z["failed_pos"], z["failed_reason"])]
            return cls(**{k: z[k] for k in cls.FIELDS if k in z.files}, failed=failed)

    @classmethod
    def concat(cls, parts: list["QueryCandidates"]) -> "QueryCandidates":
        """One record of several, ordered by query position."""
        parts = [p for p in parts if len(p.positions) or p.failed]
        if not parts:
            raise DelgGeoError("no query image could be read")
        width = max(p.ids.shape[1] for p in parts)
        extra = max(p.extra_ids.shape[1] for p in parts)
        verified = max(p.inliers.shape[1] - p.extra_ids.shape[1] for p in parts)

        def pad(a, fill, w=None):
            w = width if w is None else w
            return np.concatenate([a, np.full((len(a), w - a.shape[1]), fill, a.dtype)], axis=1)

        def inliers(p):  # the global columns, then the extra ones, each padded to the widest
            e = p.extra_ids.shape[1]
            g = p.inliers[:, : p.inliers.shape[1] - e]
            return np.concatenate([pad(g, 0, verified), pad(p.inliers[:, g.shape[1]:], 0, extra)], axis=1)

        pos = np.concatenate([p.positions for p in parts])
        order = np.argsort(pos, kind="stable")
        out = cls(
            positions=pos[order],
            global_desc=np.concatenate([p.global_desc for p in parts])[order],
            ids=np.concatenate([pad(p.ids, -1) for p in parts])[order],
            sims=np.concatenate([pad(p.sims, np.nan) for p in parts])[order],
            inliers=np.concatenate([inliers(p) for p in parts])[order],
            extract_s=np.concatenate([p.extract_s for p in parts])[order],
            search_s=np.concatenate([p.search_s for p in parts])[order],
            verify_s=np.concatenate([p.verify_s for p in parts])[order],
            failed=sorted(f for p in parts for f in p.failed),
            extra_ids=np.concatenate([pad(p.extra_ids, -1, extra) for p in parts])[order],
            extra_sims=np.concatenate([pad(p.extra_sims, np.nan, extra) for p in parts])[order],
        )
        return out

    def candidates(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        keep = self.ids[i] >= 0
        return self.ids[i][keep], self.sims[i][keep]

    def verified(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, similarities, inliers) of query ``i``'s verified candidates: the global top
        ``k``, then the inverted file's additions."""
        ids, sims = (a[:k] for a in self.candidates(i))
        e = self.extra_ids.shape[1]
        nv = self.inliers.shape[1] - e
        keep = self.extra_ids[i] >= 0
        return (np.concatenate([ids, self.extra_ids[i][keep]]), np.concatenate([sims, self.extra_sims[i][keep]]),
                np.concatenate([self.inliers[i, : min(len(ids), nv)], self.inliers[i, nv:][keep]]))


def query_candidates(geo, paths: list[str], positions: list[int], search_k: int, verify_k: int,
                     threads: int | None = None, bar=None, keep_global: bool = True) -> QueryCandidates:
    """Stage 1 for one shard of queries: extract (batched), search, verify the top ``verify_k``.

    ``keep_global=False`` leaves the global descriptors out of the record (only the classifier
    and hybrid methods need them; at 1280-D float32 they are most of a query's record)."""
    from .extract import iter_extract
    from .search import search

    t0 = time.perf_counter()
    feats, pos, failed = [], [], []
    for res in iter_extract(paths, geo.extractor, net_workers=threads):
        if res.ok:
            feats.append(res.features)
            pos.append(positions[res.index])
        else:
            failed.append((positions[res.index], res.error))
            if bar is not None:
                bar.update(1)
    n = len(feats)
    extract_s = (time.perf_counter() - t0) / max(n, 1)
    dim = int(geo.index.manifest.global_dim)
    G = np.stack([f.global_descriptor for f in feats]).astype(np.float32) if n else np.zeros((0, dim), np.float32)
    k = max(1, min(int(search_k), len(geo.index)))
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), np.nan, np.float32)
    t0 = time.perf_counter()
    for i, c in enumerate(search(geo.index, G, k) if n else []):
        ids[i, : len(c.ids)], sims[i, : len(c.ids)] = c.ids, c.similarities
    search_s = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    from .search import local_candidates

    n_extra = int(geo.config.local_top_k) if verify_k and getattr(geo.index, "asmk", None) is not None else 0
    extra_ids = np.full((n, n_extra), -1, np.int64)
    extra_sims = np.full((n, n_extra), np.nan, np.float32)
    inl = np.zeros((n, verify_k + n_extra), np.int32)
    verify_s = np.zeros(n)
    vc = geo.config.verify_config
    qw = geo.index.whitening.apply(G) if n_extra else None  # as search() whitened them
    for i, f in enumerate(feats):
        t = time.perf_counter()
        if verify_k:
            c = ids[i, :verify_k]
            c = c[c >= 0]
            q_local = geo.index.query_local(f.local_descriptors[: vc.max_features])
            inl[i, : len(c)] = geo.verify_candidates(f, c, q_local)
            if n_extra:  # the inverted file's own candidates (search time, then verification)
                t_s = time.perf_counter()
                ex = local_candidates(geo.index, qw[i], q_local, n_extra, exclude=c)
                dt = time.perf_counter() - t_s
                search_s[i] += dt
                t += dt  # counted as search, not verification
                m = len(ex.ids)
                extra_ids[i, :m], extra_sims[i, :m] = ex.ids, ex.similarities
                inl[i, verify_k : verify_k + m] = geo.verify_candidates(f, ex.ids, q_local)
        verify_s[i] = time.perf_counter() - t
        feats[i] = None  # local features are needed no longer
        if bar is not None:
            bar.update(1)
    return QueryCandidates(np.array(pos, np.int64), G if keep_global else G[:, :0], ids, sims, inl,
                           np.full(n, extract_s), search_s, verify_s, failed, extra_ids, extra_sims)


def save_candidates(path: Path, rows: list[tuple], top_k: int) -> None:
    """Every verified query's candidates as plain arrays (no pickle), for diagnosis.

    ``img_id`` (N,), and (N, top_k) arrays ``ids`` (index ids, -1 as padding), ``similarities``
    and ``inliers``. ``tools/diagnose_bench.py`` reads it.
    """
    n = len(rows)
    ids = np.full((n, top_k), -1, np.int64)
    sims = np.full((n, top_k), np.nan, np.float32)
    inl = np.zeros((n, top_k), np.int32)
    for i, (_img, c_ids, c_sims, c_inl) in enumerate(rows):
        k = min(top_k, len(c_ids))
        ids[i, :k], sims[i, :k], inl[i, :k] = c_ids[:k], c_sims[:k], c_inl[:k]
    np.savez(path, img_id=np.array([str(r[0]) for r in rows]), ids=ids, similarities=sims, inliers=inl)


def run_bench(
    index_dir: str | Path,
    queries_file: str | Path,
    images_dir: str | Path | None,
    out_dir: str | Path,
    config: BenchConfig | None = None,
    fmt: str = "auto",
    yfcc_metadata: str | Path | None = None,
    log=print,
    ray=None,
    shard_size: int = 64,
) -> BenchResult:
    """Benchmark every method in ``config`` on a query set; with ``ray`` (a
    :class:`delg_geo.ray_pool.RayOptions`), stage 1 runs on Ray workers."""
    from .locate import Geolocator, LocateConfig
    from .queries import read_queries

    cfg = config or BenchConfig()
    unknown = set(cfg.methods) - set(ALL_METHODS)
    if unknown:
        raise DelgGeoError(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, skipped = read_queries(queries_file, images_dir, fmt=fmt, yfcc_metadata=yfcc_metadata)
    for s in skipped:
        log(f"query skipped (row {s.row}): {s.image}: {s.reason}")
    if not items:
        raise DelgGeoError(f"{queries_file}: no usable query ({len(skipped)} skipped)")

    geo = Geolocator.from_index(index_dir, config=LocateConfig(top_k=cfg.top_k, local_top_k=cfg.local_top_k, places=False))
    index = geo.index
    ref_lats, ref_lons = index.lats, index.lons
    methods = list(cfg.methods)
    rows: list[dict] = []
    failed: list[dict] = []

    # 1. query features, candidates and (for "verified") inlier counts, shard by shard
    search_k = max(cfg.top_k, cfg.sift_top_k)
    verify_k = cfg.top_k if "verified" in methods else 0
    keep_global = "classifier" in methods or "hybrid" in methods
    if ray is not None:
        from .ray_bench import query_candidates_on_ray

        qc = query_candidates_on_ray(index_dir, items, out_dir, search_k, verify_k, ray, shard_size, cfg.progress, log,
                                     keep_global=keep_global, local_top_k=geo.config.local_top_k)
    else:
        bar = _bar(len(items), "query", cfg.progress)
        qc = QueryCandidates.concat([
            query_candidates(geo, [str(it.path) for it in items[s : s + shard_size]], list(range(s, s + shard_size)),
                             search_k, verify_k, bar=bar, keep_global=keep_global)
            for s in range(0, len(items), shard_size)
        ])
        bar.close()
    for p, reason in qc.failed:
        failed.append(dict(img_id=items[p].img_id, reason=reason))
        log(f"query failed: {reason}")
    ok_items = [items[p] for p in qc.positions]
    n = len(ok_items)
    if n == 0:
        raise DelgGeoError("no query image could be read")
    gt_lat = np.array([it.lat for it in ok_items])
    gt_lon = np.array([it.lon for it in ok_items])
    G = qc.global_desc
    search_s = float(qc.search_s.sum())
    delg_shared_q = qc.extract_s + qc.search_s

    preds: dict[str, list[tuple[float, float, int, float, float]]] = {m: [] for m in methods}

    def add(method, lat, lon, inliers=0, conf=float("nan"), seconds=0.0):
        preds[method].append((float(lat), float(lon), int(inliers), float(conf), float(seconds)))

    cand_rows: list[tuple] = []  # (img_id, candidate ids, similarities, inliers) for candidates.npz
    if "global" in methods or "verified" in methods or "knn" in methods:
        sigma = cfg.knn_sigma_km or geo.knn_sigma_km
        fine = None if cfg.knn_sigma_km else geo.knn_fine_km  # the same two scales as `verified`'s fallback
        for qi in range(n):
            ids, sims = (a[: cfg.top_k] for a in qc.candidates(qi))
            delg_shared = delg_shared_q[qi]
            if "global" in methods:
                add("global", ref_lats[ids[0]], ref_lons[ids[0]], 0, float(max(sims[0], 0)) * 0.5, delg_shared)
            if "knn" in methods:
                from .knn import knn_vote

                t = time.perf_counter()
                lat, lon, score = knn_vote(ref_lats[ids], ref_lons[ids], sims, sigma, fine_sigma_km=fine)
                add("knn", lat, lon, 0, score, delg_shared + time.perf_counter() - t)
            if "verified" in methods:
                t = time.perf_counter()
                v_ids, v_sims, inl = qc.verified(qi, cfg.top_k)
                cand_rows.append((ok_items[qi].img_id, v_ids, v_sims, inl))
                p = geo.decide(ok_items[qi].img_id, v_ids, v_sims, inl)
                add("verified", p.lat, p.lon, p.inliers, p.confidence,
                    delg_shared + qc.verify_s[qi] + time.perf_counter() - t)

    if "classifier" in methods or "hybrid" in methods:
        clf = _classifier(index, log)
        t = time.perf_counter()
        qv = index.whitening.apply(G)
        clat, clon, cconf = clf.predict_latlon(qv)
        top_cells = clf.predict(qv, top_k=cfg.hybrid_cells)
        dt = (time.perf_counter() - t) / n
        if "classifier" in methods:
            for qi in range(n):
                add("classifier", clat[qi], clon[qi], 0, cconf[qi], delg_shared_q[qi] + dt)
        if "hybrid" in methods:
            ref_cells = clf.partition.assign(ref_lats, ref_lons)
            for qi in range(n):
                cells, _probs = top_cells[qi]
                ids = qc.candidates(qi)[0]
                inside = ids[np.isin(ref_cells[ids], cells)]
                if len(inside):
                    add("hybrid", ref_lats[inside[0]], ref_lons[inside[0]], 0, float(cconf[qi]), delg_shared_q[qi] + dt)
                else:
                    add("hybrid", clat[qi], clon[qi], 0, float(cconf[qi]), delg_shared_q[qi] + dt)

    if "sift" in methods:
        from .sift_baseline import SiftIndex, extract_sift

        paths = [str(p) for p in index.metadata["path"]]
        t0 = time.perf_counter()
        sidx = SiftIndex(paths, cache_dir=index.path / "sift_cache", progress=cfg.progress)
        ref_s = time.perf_counter() - t0
        log(f"sift: reference features ready in {ref_s:.1f} s (cached in {index.path / 'sift_cache'})")
        bar = _bar(n, "sift", cfg.progress)
        for qi in range(n):
            t = time.perf_counter()
            try:
                qf = extract_sift(str(ok_items[qi].path))
                ids = qc.candidates(qi)[0][: cfg.sift_top_k]
                inl = sidx.match(qf, list(map(int, ids)))
                best = int(np.argmax(inl)) if inl.max(initial=0) >= 15 else 0
                j = int(ids[best])
                add("sift", ref_lats[j], ref_lons[j], int(inl[best]) if len(inl) else 0, float("nan"),
                    time.perf_counter() - t + search_s / n)
            except Exception as e:  # noqa: BLE001
                add("sift", np.nan, np.nan, 0, float("nan"), time.perf_counter() - t)
                log(f"sift failed on {ok_items[qi].img_id}: {e}")
            bar.update(1)
        bar.close()

    if "oracle" in methods:
        for qi in range(n):
            d = haversine_km(gt_lat[qi], gt_lon[qi], ref_lats, ref_lons)
            j = int(np.argmin(d))
            add("oracle", ref_lats[j], ref_lons[j])
    if "centroid" in methods:
        c = weighted_centroid(ref_lats, ref_lons)
        for qi in range(n):
            add("centroid", c[0], c[1])

    # 3. report
    countries = _country_codes(gt_lat, gt_lon)
    summaries: dict[str, MethodSummary] = {}
    errors_by_method = {}
    country_acc = {}
    for m in methods:
        arr = np.array(preds[m], dtype=np.float64).reshape(-1, 5)
        err = haversine_km(gt_lat, gt_lon, arr[:, 0], arr[:, 1])
        err = np.where(np.isfinite(err), err, np.inf)
        secs = arr[:, 4]
        summaries[m] = summarize(err, cfg.radii_km, seconds=float(secs.sum()) if m not in ("oracle", "centroid") else None)
        errors_by_method[m] = err
        if countries is not None:
            pc = _country_codes(arr[:, 0], arr[:, 1])
            country_acc[m] = float(np.mean(pc == countries)) if pc is not None else float("nan")
        for qi in range(n):
            rows.append(dict(
                img_id=ok_items[qi].img_id, gt_lat=gt_lat[qi], predicted_lat=arr[qi, 0], gt_long=gt_lon[qi],
                predicted_long=arr[qi, 1], great_circle_distance=err[qi], method=m, inliers=int(arr[qi, 2]),
                confidence=arr[qi, 3], seconds=round(arr[qi, 4], 4),
            ))
    df = pd.DataFrame(rows)
    df.to_csv(out_dir / "predictions.csv", index=False)
    if cand_rows:
        save_candidates(out_dir / "candidates.npz", cand_rows, max(len(r[1]) for r in cand_rows))
    summary = {
        "n_queries": n,
        "n_failed": len(failed),
        "n_skipped": len(skipped),
        "index": str(index.path),
        "model": index.manifest.model_id,
        "top_k": cfg.top_k,
        "methods": {},
        "failed": failed,
        "skipped": [dict(row=s.row, image=s.image, reason=s.reason) for s in skipped],
    }
    for m, s in summaries.items():
        d = {
            "median_km": s.median_km,
            "mean_km": s.mean_km,
            "queries_per_s": s.queries_per_s,
            "accuracy_at_km": {radius_key(r): s.accuracy(r) for r in cfg.radii_km},
        }
        if m in country_acc:
            d["country_accuracy"] = country_acc[m]
        summary["methods"][m] = d
    reliability = None
    if "verified" in methods:
        from .reliability import reliability_report

        conf = np.array(preds["verified"], dtype=np.float64).reshape(-1, 5)[:, 3]
        radius = geo.confidence_radius_km
        reliability = reliability_report(conf, errors_by_method["verified"] <= radius, radius)
        summary["calibration"] = dict(method="verified", calibrated=geo.calibration is not None,
                                      rule=geo.rule.to_dict(), **reliability.to_dict())
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    table = format_table(summaries, cfg.radii_km)
    lines = [f"# delg-geo benchmark: {n} queries", "", table, ""]
    if reliability is not None:
        from .calibrate import format_radius
        from .reliability import format_reliability, reliability_png

        state = ("fitted on the index's own photos" if geo.calibration is not None
                 else "the index has no calibration: this is an uncalibrated score")
        lines += [format_reliability(reliability, "verified", state).rstrip("\n"), ""]
        reliability_png(conf, errors_by_method["verified"] <= radius, out_dir / "reliability.png", radius,
                        title=f"verified: within {format_radius(radius)}")
        lines += ["![error CDF](error_cdf.png) ![reliability](reliability.png)", ""]
    else:
        lines += ["![error CDF](error_cdf.png)", ""]
    if country_acc:
        lines += ["Country accuracy (same country code as the truth): "
                  + ", ".join(f"{m} {v:.1%}" for m, v in country_acc.items()), ""]
    if failed or skipped:
        lines += [f"{len(failed)} queries failed and {len(skipped)} were skipped; see summary.json.", ""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    error_cdf_png(errors_by_method, out_dir / "error_cdf.png")
    if cfg.map:
        from .mapview import write_bench_map

        main = "verified" if "verified" in methods else methods[0]
        sub = df[df.method == main]
        write_bench_map(
            [dict(img_id=r.img_id, gt_lat=r.gt_lat, gt_lon=r.gt_long, pred_lat=r.predicted_lat, pred_lon=r.predicted_long,
                  error_km=r.great_circle_distance) for r in sub.itertuples()],
            out_dir / "bench_map.html", title=f"delg-geo bench: {main}",
        )
    if ray is not None:  # the report is written: the query shards have served
        from .ray_bench import remove_shards

        remove_shards(out_dir)
    return BenchResult(out_dir, summaries, df, failed, skipped)


def _classifier(index, log):
    from .classifier import CellClassifier

    d = index.path / "classifier"
    if (d / "classifier.json").exists():
        clf = CellClassifier.load(d)
        if clf.info.get("index_updated") == index.manifest.updated:
            return clf
        log("the index changed since its classifier was trained: retraining with the default t1/t2")
    else:
        log("no classifier in the index yet: training one with the default t1/t2")
    return train_index_classifier(index.path)


def train_index_classifier(index_dir, t1: int | None = None, t2: int | None = None, epochs: int = 30,
                           label_smoothing_km=None, seed: int = 0):
    """Train the S2-cell classifier on an index's whitened global descriptors and save it there."""
    from .cells import build_partition, default_thresholds
    from .classifier import train_classifier
    from .index import GeoIndex

    index = GeoIndex(index_dir, device="cpu")
    lats, lons = index.lats, index.lons
    dt1, dt2 = default_thresholds(lats, lons)
    t1, t2 = t1 or dt1, t2 or dt2
    part = build_partition(lats, lons, t1, t2)
    if len(part.cells) < 2:
        raise DelgGeoError(f"t1={t1}, t2={t2} leave {len(part.cells)} cell(s); lower t1/t2")
    x = index.search_vectors()
    clf = train_classifier(x, lats, lons, part, epochs=epochs, label_smoothing_km=label_smoothing_km, seed=seed)
    clf.info["index_updated"] = index.manifest.updated
    clf.info["defaults"] = {"t1": dt1, "t2": dt2}
    clf.save(index.path / "classifier")
    return clf


def _country_codes(lats, lons):
    try:
        from .places import nearest_places
    except ImportError:  # pragma: no cover
        return None
    lats = np.asarray(lats, float)
    lons = np.asarray(lons, float)
    ok = np.isfinite(lats) & np.isfinite(lons)
    out = np.array([""] * len(lats), dtype=object)
    if ok.any():
        out[ok] = [p.country_code for p in nearest_places(lats[ok], lons[ok])]
    return out


def _bar(n, desc, enabled):
    if not enabled:
        class _Null:
            def update(self, k):
                pass

            def close(self):
                pass

        return _Null()
    from tqdm import tqdm

    return tqdm(total=n, desc=desc, unit="q")

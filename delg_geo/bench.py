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

Query features are extracted once (batched) and shared by the DELG-based methods; each
method's ``seconds`` counts that shared extraction plus its own work.
"""

from __future__ import annotations

import json
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
) -> BenchResult:
    from .extract import iter_extract
    from .locate import Geolocator, LocateConfig
    from .queries import read_queries
    from .search import search

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

    geo = Geolocator.from_index(index_dir, config=LocateConfig(top_k=cfg.top_k, places=False))
    index = geo.index
    ref_lats, ref_lons = index.lats, index.lons
    methods = list(cfg.methods)
    rows: list[dict] = []
    failed: list[dict] = []

    # 1. query features, batched
    t0 = time.perf_counter()
    feats, ok_items = [], []
    for res in iter_extract([str(it.path) for it in items], geo.extractor, progress="extract" if cfg.progress else False):
        if res.ok:
            feats.append(res.features)
            ok_items.append(items[res.index])
        else:
            failed.append(dict(img_id=items[res.index].img_id, reason=res.error))
            log(f"query failed: {res.error}")
    extract_s = time.perf_counter() - t0
    n = len(ok_items)
    if n == 0:
        raise DelgGeoError("no query image could be read")
    gt_lat = np.array([it.lat for it in ok_items])
    gt_lon = np.array([it.lon for it in ok_items])
    per_query_extract = extract_s / n

    # 2. global search for everyone
    t0 = time.perf_counter()
    G = np.stack([f.global_descriptor for f in feats])
    cands = search(index, G, max(cfg.top_k, cfg.sift_top_k))
    search_s = time.perf_counter() - t0
    delg_shared = per_query_extract + search_s / n

    preds: dict[str, list[tuple[float, float, int, float, float]]] = {m: [] for m in methods}

    def add(method, lat, lon, inliers=0, conf=float("nan"), seconds=0.0):
        preds[method].append((float(lat), float(lon), int(inliers), float(conf), float(seconds)))

    cand_rows: list[tuple] = []  # (img_id, candidate ids, similarities, inliers) for candidates.npz
    if "global" in methods or "verified" in methods or "knn" in methods:
        sigma = cfg.knn_sigma_km or geo.knn_sigma_km
        bar = _bar(n, "verify" if "verified" in methods else "search", cfg.progress)
        for qi in range(n):
            c = cands[qi]
            ids, sims = c.ids[: cfg.top_k], c.similarities[: cfg.top_k]
            if "global" in methods:
                add("global", ref_lats[ids[0]], ref_lons[ids[0]], 0, float(max(sims[0], 0)) * 0.5, delg_shared)
            if "knn" in methods:
                from .knn import knn_vote

                t = time.perf_counter()
                lat, lon, score = knn_vote(ref_lats[ids], ref_lons[ids], sims, sigma)
                add("knn", lat, lon, 0, score, delg_shared + time.perf_counter() - t)
            if "verified" in methods:
                t = time.perf_counter()
                inl = geo.verify_candidates(feats[qi], ids)
                cand_rows.append((ok_items[qi].img_id, ids, sims, inl))
                p = geo.decide(ok_items[qi].img_id, ids, sims, inl)
                add("verified", p.lat, p.lon, p.inliers, p.confidence, delg_shared + time.perf_counter() - t)
            bar.update(1)
        bar.close()

    if "classifier" in methods or "hybrid" in methods:
        clf = _classifier(index, log)
        t = time.perf_counter()
        qv = index.whitening.apply(G)
        clat, clon, cconf = clf.predict_latlon(qv)
        top_cells = clf.predict(qv, top_k=cfg.hybrid_cells)
        dt = (time.perf_counter() - t) / n
        if "classifier" in methods:
            for qi in range(n):
                add("classifier", clat[qi], clon[qi], 0, cconf[qi], delg_shared + dt)
        if "hybrid" in methods:
            ref_cells = clf.partition.assign(ref_lats, ref_lons)
            for qi in range(n):
                cells, _probs = top_cells[qi]
                ids = cands[qi].ids
                inside = ids[np.isin(ref_cells[ids], cells)]
                if len(inside):
                    add("hybrid", ref_lats[inside[0]], ref_lons[inside[0]], 0, float(cconf[qi]), delg_shared + dt)
                else:
                    add("hybrid", clat[qi], clon[qi], 0, float(cconf[qi]), delg_shared + dt)

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
                ids = cands[qi].ids[: cfg.sift_top_k]
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
        save_candidates(out_dir / "candidates.npz", cand_rows, cfg.top_k)
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
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    table = format_table(summaries, cfg.radii_km)
    lines = [f"# delg-geo benchmark: {n} queries", "", table, ""]
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
    x = index.whitening.apply(np.load(index.path / "global_raw.npy"))
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

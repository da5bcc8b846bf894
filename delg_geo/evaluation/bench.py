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
(:mod:`delg_geo.retrieval.reliability`): a calibration table, the expected calibration error, the
precision and coverage of answers above 0.5 and 0.8, and ``reliability.png`` beside
``error_cdf.png``.

Query features are extracted once (batched) and shared by the DELG-based methods; each
method's ``seconds`` counts that shared extraction plus its own work. The first stage (extract,
search, verify: :func:`query_candidates`) runs over shards of queries, so memory stays bounded
by a shard; with ``ray`` the shards run on Ray workers (:mod:`delg_geo.evaluation.ray_bench`) and every
later stage is the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from delg_geo.core.progress import progress_bar as _bar
from delg_geo.core.errors import DelgGeoError
from delg_geo.core.jsonio import dumps as json_dumps
from delg_geo.evaluation.metrics import DEFAULT_RADII_KM, MethodSummary, error_cdf_png, format_table, radius_key, summarize
from delg_geo.core.geo import haversine_km, weighted_centroid
from delg_geo.evaluation.candidates import QueryCandidates, query_candidates, save_candidates  # noqa: F401 (public here too)

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

    def __post_init__(self):
        """Refuse settings that would fail only after every query has run: radii must be
        positive, finite km; counts whole numbers (top_k at least 1)."""
        import math

        from delg_geo.core.errors import InvalidArgumentError

        bad = [r for r in self.radii_km if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)]
        if bad or not self.radii_km:
            raise InvalidArgumentError(f"radii_km must be positive distances in km, got {list(self.radii_km)}")
        for name, low in (("top_k", 1), ("sift_top_k", 1), ("hybrid_cells", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise InvalidArgumentError(f"{name} must be a whole number of at least {low}, got {v!r}")


@dataclass
class BenchResult:
    out_dir: Path
    summaries: dict[str, MethodSummary]
    predictions: pd.DataFrame
    failed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


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
    :class:`delg_geo.core.ray_pool.RayOptions`), stage 1 runs on Ray workers. The index is only
    read: caches (the SIFT features, the classifier) go under ``out_dir``."""
    from delg_geo.evaluation.queries import read_queries
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

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
    qc, ok_items, failed = _query_stage(geo, index_dir, items, out_dir, cfg, ray, shard_size, log)
    run = _Run(geo, cfg, qc, ok_items, out_dir, log)
    run.retrieval_methods()
    run.classifier_methods()
    run.sift_method()
    run.floor_methods()
    df, summaries = _report(run, failed, skipped)
    if ray is not None:  # the report is written: the query shards have served
        from delg_geo.evaluation.ray_bench import remove_shards

        remove_shards(out_dir)
    return BenchResult(out_dir, summaries, df, failed, skipped)


def _query_stage(geo, index_dir, items, out_dir: Path, cfg: BenchConfig, ray, shard_size: int, log):
    """Stage 1: query features, candidates and (for "verified") inlier counts, shard by shard."""
    methods = cfg.methods
    search_k = max(cfg.top_k, cfg.sift_top_k)
    verify_k = cfg.top_k if "verified" in methods else 0
    keep_global = "classifier" in methods or "hybrid" in methods
    if ray is not None:
        from delg_geo.evaluation.ray_bench import query_candidates_on_ray

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
    failed = []
    for p, reason in qc.failed:
        failed.append(dict(img_id=items[p].img_id, reason=reason))
        log(f"query failed: {reason}")
    ok_items = [items[p] for p in qc.positions]
    if not ok_items:
        raise DelgGeoError("no query image could be read")
    return qc, ok_items, failed


class _Run:
    """One benchmark's shared state: the first stage's candidates and each method's answers."""

    def __init__(self, geo, cfg: BenchConfig, qc, ok_items, out_dir: Path, log):
        self.geo, self.cfg, self.qc, self.items, self.out_dir, self.log = geo, cfg, qc, ok_items, out_dir, log
        self.index = geo.index
        self.methods = list(cfg.methods)
        self.n = len(ok_items)
        self.gt_lat = np.array([it.lat for it in ok_items])
        self.gt_lon = np.array([it.lon for it in ok_items])
        self.shared = qc.extract_s + qc.search_s  # each DELG-based method's share of stage 1
        self.preds: dict[str, list[tuple[float, float, int, float, float]]] = {m: [] for m in self.methods}
        self.cand_rows: list[tuple] = []  # (img_id, candidate ids, similarities, inliers) for candidates.npz

    def add(self, method, lat, lon, inliers=0, conf=float("nan"), seconds=0.0):
        self.preds[method].append((float(lat), float(lon), int(inliers), float(conf), float(seconds)))

    def retrieval_methods(self) -> None:
        """``global``, ``knn`` and ``verified``, from the stage-1 candidates."""
        ms, cfg, geo, qc = self.methods, self.cfg, self.geo, self.qc
        if not ({"global", "verified", "knn"} & set(ms)):
            return
        from delg_geo.retrieval.knn import knn_vote

        lats, lons = self.index.lats, self.index.lons
        sigma = cfg.knn_sigma_km or geo.knn_sigma_km
        fine = None if cfg.knn_sigma_km else geo.knn_fine_km  # the same two scales as `verified`'s fallback
        for qi in range(self.n):
            ids, sims = (a[: cfg.top_k] for a in qc.candidates(qi))
            shared = self.shared[qi]
            if "global" in ms:
                self.add("global", lats[ids[0]], lons[ids[0]], 0, float(max(sims[0], 0)) * 0.5, shared)
            if "knn" in ms:
                t = time.perf_counter()
                lat, lon, score = knn_vote(lats[ids], lons[ids], sims, sigma, fine_sigma_km=fine)
                self.add("knn", lat, lon, 0, score, shared + time.perf_counter() - t)
            if "verified" in ms:
                t = time.perf_counter()
                v_ids, v_sims, inl = qc.verified(qi, cfg.top_k)
                self.cand_rows.append((self.items[qi].img_id, v_ids, v_sims, inl))
                p = geo.decide(self.items[qi].img_id, v_ids, v_sims, inl)
                self.add("verified", p.lat, p.lon, p.inliers, p.confidence, shared + qc.verify_s[qi] + time.perf_counter() - t)

    def classifier_methods(self) -> None:
        """``classifier`` (the top S2 cell) and ``hybrid`` (retrieval inside the top cells)."""
        ms = self.methods
        if "classifier" not in ms and "hybrid" not in ms:
            return
        lats, lons = self.index.lats, self.index.lons
        clf = _classifier(self.index, self.out_dir, self.log)
        t = time.perf_counter()
        qv = self.index.whitening.apply(self.qc.global_desc)
        clat, clon, cconf = clf.predict_latlon(qv)
        top_cells = clf.predict(qv, top_k=self.cfg.hybrid_cells)
        dt = (time.perf_counter() - t) / self.n
        ref_cells = clf.partition.assign(lats, lons) if "hybrid" in ms else None
        for qi in range(self.n):
            if "classifier" in ms:
                self.add("classifier", clat[qi], clon[qi], 0, cconf[qi], self.shared[qi] + dt)
            if "hybrid" in ms:
                ids = self.qc.candidates(qi)[0]
                inside = ids[np.isin(ref_cells[ids], top_cells[qi][0])]
                lat, lon = (lats[inside[0]], lons[inside[0]]) if len(inside) else (clat[qi], clon[qi])
                self.add("hybrid", lat, lon, 0, float(cconf[qi]), self.shared[qi] + dt)

    def sift_method(self) -> None:
        """``sift``: rootSIFT and pydegensac over the global top ``sift_top_k``."""
        if "sift" not in self.methods:
            return
        from delg_geo.evaluation.sift_baseline import SiftIndex, extract_sift

        lats, lons, n = self.index.lats, self.index.lons, self.n
        paths = [str(p) for p in self.index.metadata["path"]]
        cache = self.out_dir / "sift_cache"
        t0 = time.perf_counter()
        sidx = SiftIndex(paths, cache_dir=cache, progress=self.cfg.progress)
        self.log(f"sift: reference features ready in {time.perf_counter() - t0:.1f} s (cached in {cache})")
        search_s = float(self.qc.search_s.sum())
        bar = _bar(n, "sift", self.cfg.progress)
        for qi in range(n):
            t = time.perf_counter()
            try:
                qf = extract_sift(str(self.items[qi].path))
                ids = self.qc.candidates(qi)[0][: self.cfg.sift_top_k]
                inl = sidx.match(qf, list(map(int, ids)))
                best = int(np.argmax(inl)) if inl.max(initial=0) >= 15 else 0
                j = int(ids[best])
                self.add("sift", lats[j], lons[j], int(inl[best]) if len(inl) else 0, float("nan"),
                         time.perf_counter() - t + search_s / n)
            except Exception as e:  # noqa: BLE001
                self.add("sift", np.nan, np.nan, 0, float("nan"), time.perf_counter() - t)
                self.log(f"sift failed on {self.items[qi].img_id}: {e}")
            bar.update(1)
        bar.close()

    def floor_methods(self) -> None:
        """``oracle`` (the reference nearest the truth) and ``centroid`` (the collection's)."""
        lats, lons = self.index.lats, self.index.lons
        if "oracle" in self.methods:
            for qi in range(self.n):
                j = int(np.argmin(haversine_km(self.gt_lat[qi], self.gt_lon[qi], lats, lons)))
                self.add("oracle", lats[j], lons[j])
        if "centroid" in self.methods:
            c = weighted_centroid(lats, lons)
            for qi in range(self.n):
                self.add("centroid", c[0], c[1])


def _report(run: _Run, failed: list, skipped: list) -> tuple[pd.DataFrame, dict]:
    """Stage 3: ``predictions.csv``, ``candidates.npz``, ``summary.json``, ``summary.md`` and the
    plots (and ``bench_map.html`` with ``map``)."""
    cfg, out_dir, n, methods = run.cfg, run.out_dir, run.n, run.methods
    countries = _country_codes(run.gt_lat, run.gt_lon)
    summaries: dict[str, MethodSummary] = {}
    errors_by_method, country_acc, rows = {}, {}, []
    for m in methods:
        arr = np.array(run.preds[m], dtype=np.float64).reshape(-1, 5)
        err = haversine_km(run.gt_lat, run.gt_lon, arr[:, 0], arr[:, 1])
        err = np.where(np.isfinite(err), err, np.inf)
        summaries[m] = summarize(err, cfg.radii_km, seconds=float(arr[:, 4].sum()) if m not in ("oracle", "centroid") else None)
        errors_by_method[m] = err
        if countries is not None:
            pc = _country_codes(arr[:, 0], arr[:, 1])
            country_acc[m] = float(np.mean(pc == countries)) if pc is not None else float("nan")
        for qi in range(n):
            rows.append(dict(
                img_id=run.items[qi].img_id, gt_lat=run.gt_lat[qi], predicted_lat=arr[qi, 0], gt_long=run.gt_lon[qi],
                predicted_long=arr[qi, 1], great_circle_distance=err[qi], great_circle_distance_km=err[qi], method=m,
                inliers=int(arr[qi, 2]), confidence=arr[qi, 3], seconds=round(arr[qi, 4], 4),
            ))
    df = pd.DataFrame(rows)
    df.to_csv(out_dir / "predictions.csv", index=False)
    if run.cand_rows:
        save_candidates(out_dir / "candidates.npz", run.cand_rows, max(len(r[1]) for r in run.cand_rows))
    summary = _summary(run, summaries, country_acc, failed, skipped)
    reliability = None
    if "verified" in methods:
        from delg_geo.retrieval.reliability import reliability_report

        conf = np.array(run.preds["verified"], dtype=np.float64).reshape(-1, 5)[:, 3]
        radius = run.geo.confidence_radius_km
        reliability = reliability_report(conf, errors_by_method["verified"] <= radius, radius)
        summary["calibration"] = dict(method="verified", calibrated=run.geo.calibration is not None,
                                      rule=run.geo.rule.to_dict(), **reliability.to_dict())
    (out_dir / "summary.json").write_text(json_dumps(summary, indent=2))
    lines = [f"# delg-geo benchmark: {n} queries", "", format_table(summaries, cfg.radii_km), ""]
    if reliability is not None:
        from delg_geo.retrieval.confidence import format_radius
        from delg_geo.retrieval.reliability import format_reliability, reliability_png

        state = ("fitted on the index's own photos" if run.geo.calibration is not None
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
        from delg_geo.evaluation.mapview import write_bench_map

        main = "verified" if "verified" in methods else methods[0]
        write_bench_map(
            [dict(img_id=r.img_id, gt_lat=r.gt_lat, gt_lon=r.gt_long, pred_lat=r.predicted_lat, pred_lon=r.predicted_long,
                  error_km=r.great_circle_distance) for r in df[df.method == main].itertuples()],
            out_dir / "bench_map.html", title=f"delg-geo bench: {main}",
        )
    return df, summaries


def _summary(run: _Run, summaries: dict, country_acc: dict, failed: list, skipped: list) -> dict:
    summary = {
        "n_queries": run.n,
        "n_failed": len(failed),
        "n_skipped": len(skipped),
        "index": str(run.index.path),
        "model": run.index.manifest.model_id,
        "top_k": run.cfg.top_k,
        "methods": {},
        "failed": failed,
        "skipped": [dict(row=s.row, image=s.image, reason=s.reason) for s in skipped],
    }
    for m, s in summaries.items():
        d = {
            "median_km": s.median_km,
            "mean_km": s.mean_km,
            "queries_per_s": s.queries_per_s,
            "accuracy_at_km": {radius_key(r): s.accuracy(r) for r in run.cfg.radii_km},
        }
        if m in country_acc:
            d["country_accuracy"] = country_acc[m]
        summary["methods"][m] = d
    return summary


def _classifier(index, out_dir: Path, log):
    """The index's own classifier (``delg-geo classifier train``) when it is current, else one
    trained with the default t1/t2 into ``out_dir/classifier`` (the index is not written)."""
    from delg_geo.evaluation.classifier import CellClassifier

    for d in (index.path / "classifier", out_dir / "classifier"):
        if (d / "classifier.json").exists():
            clf = CellClassifier.load(d)
            if clf.info.get("index_updated") == index.manifest.updated:
                return clf
    log(f"no current classifier for this index: training one with the default t1/t2 into {out_dir / 'classifier'}")
    return train_index_classifier(index.path, out=out_dir / "classifier")


def train_index_classifier(index_dir, t1: int | None = None, t2: int | None = None, epochs: int = 30,
                           label_smoothing_km=None, seed: int = 0, out: str | Path | None = None):
    """Train the S2-cell classifier on an index's whitened global descriptors and save it in
    ``out`` (default: the index's ``classifier/`` folder)."""
    from delg_geo.evaluation.cells import build_partition, default_thresholds
    from delg_geo.evaluation.classifier import train_classifier
    from delg_geo.core.errors import InvalidArgumentError
    from delg_geo.index.geo_index import GeoIndex

    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise InvalidArgumentError(f"epochs must be a whole number of at least 1, got {epochs!r}")
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
    clf.save(Path(out) if out is not None else index.path / "classifier")
    return clf


def _country_codes(lats, lons):
    try:
        from delg_geo.core.places import nearest_places
    except ImportError:  # pragma: no cover
        return None
    lats = np.asarray(lats, float)
    lons = np.asarray(lons, float)
    ok = np.isfinite(lats) & np.isfinite(lons)
    out = np.array([""] * len(lats), dtype=object)
    if ok.any():
        out[ok] = [p.country_code for p in nearest_places(lats[ok], lons[ok])]
    return out

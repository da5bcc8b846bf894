"""Measure compact-index choices on a built format-1 index, without re-extracting anything.

    python tools/compact_choices.py --index runs/venice-index --queries ../shared/data/venice/queries.csv \
        --cache runs/venice-query-features.npz --out runs/compact-choices.json

The index must be a format-1 index (float16 local descriptors at the model's dimension and raw
float32 global descriptors, as ``--keep-raw`` or an older delg-geo writes). The queries' features
are extracted once into ``--cache``. Each variant re-encodes the index's own features (fewer
local features per image, a local codec, a global dimension) exactly as ``index build`` would,
verifies every query's top-k candidates, and scores the default decision rule within 100 m.

Held-out: ``python tools/compact_choices.py summarise RESULTS.json ...`` prints the table and
picks, on a random half of the queries, the smallest variant within 32 KB an image and within
``--max-loss`` points of today's, then scores it against today's on the other half (``--splits``
random splits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # verification runs two candidates at a time already
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# local codecs: (name, codec, dim, pq_m, features per image); each is scored with every global variant
CODECS = [
    ("float16 112-D (today)", "float16", None, None, 500),
    ("PCA 48-D int8", "pca-int8", 48, None, 500),
    ("PQ 112-D, 28 bytes", "pq", 112, 28, 500),
    ("binary 112 bits", "pca-binary", 112, None, 500),
    ("PCA 64-D int8, 400 features", "pca-int8", 64, None, 400),
    ("PCA 32-D int8", "pca-int8", 32, None, 500),
    ("float16 112-D, again (RANSAC noise)", "float16", None, None, 500),
    ("int8 112-D", "pca-int8", 112, None, 500),
    ("PCA 64-D int8, 300 features", "pca-int8", 64, None, 300),
]
GLOBALS = [None, 256, 128]  # None: today's (all components, float32)


def cache_queries(queries, images, cache: Path, extractor):
    from delg_geo.features.extract import iter_extract
    from delg_geo.evaluation.queries import read_queries

    items, _ = read_queries(queries, images)
    feats = [None] * len(items)
    for r in iter_extract([str(i.path) for i in items], extractor, progress="queries"):
        if not r.ok:
            raise SystemExit(f"cannot extract {r.path}: {r.error}")
        feats[r.index] = r.features
    np.savez(cache, global_raw=np.stack([f.global_descriptor for f in feats]),
             counts=np.array([f.num_local for f in feats]), keypoints=np.concatenate([f.keypoints for f in feats]),
             descriptors=np.concatenate([f.local_descriptors for f in feats]).astype(np.float32),
             sizes=np.array([f.image_size for f in feats]), lats=np.array([i.lat for i in items]),
             lons=np.array([i.lon for i in items]), fingerprint=np.asarray(extractor.fingerprint))


def codec_bytes(codec) -> int:
    return sum(v.nbytes for v in (codec.mean, codec.projection, codec.scales, codec.centroids) if v is not None)


def accuracy(pred_lat, pred_lon, lat, lon, km=0.1):
    from delg_geo.core.geo import haversine_km

    return haversine_km(pred_lat, pred_lon, lat, lon) <= km


def held_out(results: list[dict], splits: int = 20, max_loss: float = 1.0, budget: int = 32 * 1024, seed: int = 0) -> dict:
    """Pick, on a random half of the queries, the smallest variant within ``budget`` bytes whose
    accuracy is within ``max_loss`` points of today's; score it and today's on the other half."""
    base = next(r for r in results if r["local"]["kind"] == "float16" and r["global_dtype"] == "float32")
    cands = [r for r in results if r["bytes_per_image"] <= budget]
    hits = {id(r): np.asarray(r["hits"], bool) for r in results}
    n = len(base["hits"])
    rng = np.random.default_rng(seed)
    picks, loss = [], []
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        ok = [r for r in cands if 100 * (hits[id(r)][a].mean() - hits[id(base)][a].mean()) >= -max_loss]
        if not ok:
            continue
        pick = min(ok, key=lambda r: r["bytes_per_image"])
        picks.append(f"{pick['codec']}, global {pick['global_dim']}-D")
        loss.append(100 * (hits[id(pick)][b].mean() - hits[id(base)][b].mean()))
    from collections import Counter

    return dict(splits=splits, picked=dict(Counter(picks)), held_out_change_points=dict(
        mean=round(float(np.mean(loss)), 2), min=round(float(np.min(loss)), 2), max=round(float(np.max(loss)), 2)))


def summarise(files: list[Path], splits: int, max_loss: float) -> dict:
    results = [r for f in files for r in json.loads(Path(f).read_text())]
    rows = sorted(results, key=lambda r: -r["bytes_per_image"])
    print("| local descriptors | features | global | bytes/image | within 100 m | global top-1 |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['codec']} | {r['features']} | {r['global_dim']}-D {r['global_dtype']} | {r['bytes_per_image']:,} | "
              f"{r['within_100m']:.1f} % | {r['global_top1_100m']:.1f} % |")
    out = held_out(results, splits, max_loss)
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "summarise":
        ap = argparse.ArgumentParser(description="the table and the held-out choice from result files")
        ap.add_argument("files", nargs="+", type=Path)
        ap.add_argument("--splits", type=int, default=20)
        ap.add_argument("--max-loss", type=float, default=1.0)
        a = ap.parse_args(sys.argv[2:])
        return summarise(a.files, a.splits, a.max_loss)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--only", default="", help="comma-separated variant numbers")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--max-loss", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N queries (a smoke test)")
    args = ap.parse_args(argv)

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import VOTE_BASE_DEFAULTS, Geolocator, LocateConfig
    from delg_geo.index.store import fit_local_codec
    from delg_geo.retrieval.verify import VERIFY_DEFAULTS, verify_pair
    from delg_geo.index.whitening import fit_pca_whitening

    index = GeoIndex(args.index, device="cpu")
    if not args.cache.exists():
        from delg_geo.features.models import get_extractor

        cache_queries(args.queries, args.images, args.cache, get_extractor(index.manifest.model_id))
    q = dict(np.load(args.cache, allow_pickle=False))
    if str(q["fingerprint"]) != index.manifest.model_fingerprint:
        raise SystemExit(f"{args.cache} holds features of another model; delete it")
    q_off = np.concatenate([[0], np.cumsum(q["counts"])])
    nq = args.limit or len(q["lats"])
    q["lats"], q["lons"] = q["lats"][:nq], q["lons"][:nq]
    # DELG local features (the defaults of that type)
    cfg = LocateConfig(top_k=args.top_k, places=False, verify_config=VERIFY_DEFAULTS["delg"],
                       vote_base_inliers=VOTE_BASE_DEFAULTS["delg"])
    vc = cfg.verify_config
    geo = Geolocator.__new__(Geolocator)  # only the decision rule is used: no extractor needed
    geo.index, geo.config = index, cfg
    from delg_geo.retrieval.knn import default_sigma_km

    geo.knn_sigma_km = default_sigma_km(index.lats, index.lons)

    raw = np.load(args.index / "global_raw.npy")
    off = index.offsets
    n = len(index)
    msh = index.manifest.whitening
    rng = np.random.default_rng(0)
    sample_rows = np.concatenate([np.arange(off[i], min(off[i + 1], off[i] + 500)) for i in range(n)])
    sample_rows = np.sort(rng.choice(sample_rows, min(len(sample_rows), 200_000), replace=False))
    local_sample = np.asarray(index.local.codes[sample_rows], np.float32)
    pool = ThreadPoolExecutor(2)
    results = []
    only = {int(s) for s in args.only.split(",") if s}
    tops, simsd, gbytes = {}, {}, {}
    for gdim in GLOBALS:
        if gdim is None:
            refs, qs = index.whitening.apply(raw), index.whitening.apply(q["global_raw"])
            gbytes[gdim] = raw.shape[1] * 4 * 2 + (args.index / "whitening.npz").stat().st_size / n  # faiss + raw
        else:
            wh = fit_pca_whitening(raw, dim=gdim, power=msh.get("power", 0.5), shrinkage=msh.get("shrinkage", 0.1))
            refs = wh.apply(raw).astype(np.float16).astype(np.float32)
            qs = wh.apply(q["global_raw"])
            gbytes[gdim] = gdim * 2 + (wh.mean.nbytes + wh.projection.nbytes) / n
        simsd[gdim] = qs[:nq] @ refs.T
        tops[gdim] = np.argsort(-simsd[gdim], axis=1)[:, : args.top_k]
    md_bytes = sum((args.index / f).stat().st_size for f in ("metadata.csv", "manifest.json", "skipped.csv")) / n
    for ci_, (name, kind, ldim, pq_m, nfeat) in enumerate(CODECS):
        if only and ci_ not in only:
            continue
        t0 = time.perf_counter()
        codec = fit_local_codec(local_sample, kind, ldim, pq_m)
        compact = kind != "float16"
        cache = {}

        def ref_feats(i):
            if i not in cache:
                a, b = int(off[i]), int(min(off[i + 1], off[i] + nfeat))
                kp = np.asarray(index.local.keypoints[a:b], np.float32)
                d = np.asarray(index.local.codes[a:b], np.float32)
                if compact:
                    kp = np.rint(kp).astype(np.float32)
                    d = codec.decode(codec.encode(d))
                cache[i] = (kp, d)
            return cache[i]

        qproj = [codec.project(q["descriptors"][q_off[qi]: q_off[qi + 1]][: vc.max_features]) for qi in range(nq)]

        def one(job):
            qi, c = job
            qkp = q["keypoints"][q_off[qi]: q_off[qi + 1]][: vc.max_features]
            kp, d = ref_feats(c)
            return verify_pair(qkp, qproj[qi], kp, d, vc, tuple(q["sizes"][qi]), index.image_size(c)).inliers

        jobs = sorted({(qi, int(c)) for t in tops.values() for qi in range(nq) for c in t[qi]})
        for c in sorted({c for _, c in jobs}):
            ref_feats(c)
        inl = dict(zip(jobs, pool.map(one, jobs)))
        for gdim in GLOBALS:
            if not compact and gdim is not None and ci_ > 0:
                continue
            top, sims = tops[gdim], simsd[gdim]
            plat, plon = np.zeros(nq), np.zeros(nq)
            for qi in range(nq):
                p = geo.decide("", top[qi], sims[qi, top[qi]], np.array([inl[(qi, int(c))] for c in top[qi]]))
                plat[qi], plon[qi] = p.lat, p.lon
            hit = accuracy(plat, plon, q["lats"], q["lons"])
            glob = accuracy(index.lats[top[:, 0]], index.lons[top[:, 0]], q["lats"], q["lons"])
            if compact:
                lbytes = nfeat * (4 + codec.bytes_per_feature) + 8 + codec_bytes(codec) / n  # uint16 keypoints, offsets
            else:
                lbytes = sum((args.index / f).stat().st_size for f in ("local_keypoints.npy", "local_descriptors.npy",
                             "local_scores.npy", "local_offsets.npy")) / n
            r = dict(codec=name, local=codec.info(), features=nfeat, global_dim=gdim or raw.shape[1],
                     global_dtype="float32" if gdim is None else "float16",
                     bytes_per_image=round(gbytes[gdim] + lbytes + md_bytes), local_bytes=round(lbytes),
                     global_bytes=round(gbytes[gdim]), within_100m=round(100 * hit.mean(), 1),
                     global_top1_100m=round(100 * glob.mean(), 1), hits=hit.astype(int).tolist(),
                     seconds=round(time.perf_counter() - t0, 1))
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "hits"}), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    return {"variants": results}


if __name__ == "__main__":
    main()

"""Compare local-feature types for verification on a benchmark, without rebuilding indexes.

Two steps, so variants can be compared in seconds once the features are cached:

1. ``extract``: one local-feature type (``delg`` | ``xfeat`` | ``aliked-n16``) for every image of
   an index and every query, into one ``.npz`` (keypoints in original-image pixels, float16
   descriptors, per-image offsets), with the extraction throughput.

       python tools/compare_local.py extract --local xfeat --index runs/venice-index \\
           --queries ../shared/data/venice/queries.csv --out runs/local-cache/xfeat.npz

   ``compact`` then encodes such a cache as ``index build`` stores it (best 500 per reference,
   PCA-48 int8), so the default store's accuracy is measured without building an index.

2. ``verify``: re-verify each query's global candidates (a candidates ``.npz`` as ``delg-geo
   bench`` writes it: ``ids``, ``similarities``, same query order as the queries file) with the
   cached features, for one or more verification settings, and write the inlier counts.

       python tools/compare_local.py verify --cache runs/local-cache/xfeat.npz \\
           --candidates runs/venice-bench/candidates.npz --index runs/venice-index \\
           --px 4 --ratio 0.9 --max-features 1024 --out runs/local-cache/xfeat-inliers.npz

``evaluate`` then scores saved inlier files with the decision rule, its settings picked on one
random half of the queries and reported on the other half (ten repeats). ``throughput`` times
the whole extraction an ``index build`` runs (global DELG + the local features) per choice, in
one run, so the ratios hold whatever else loads the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _extract(args) -> None:
    import pandas as pd

    from tqdm import tqdm

    from delg_geo.core.errors import DelgGeoError
    from delg_geo.features.images import load_image
    from delg_geo.features.models.local_features import load_local_for_cache
    from delg_geo.evaluation.queries import read_queries

    md = pd.read_csv(Path(args.index) / "metadata.csv")
    items, _ = read_queries(args.queries, None)
    paths = list(md["path"]) + [str(i.path) for i in items]
    if args.limit:
        paths = paths[: args.limit]
    extractor = load_local_for_cache(args.local, top_k=args.top_k, max_side=args.max_side, upscale=args.upscale)
    kp, de, sc, counts = [], [], [], []
    t0 = time.perf_counter()
    # the local features only (no global descriptor, which iter_extract would refuse as missing)
    for path in tqdm(paths, desc="extract"):
        try:
            image = load_image(path, max_side=extractor.max_side)
        except (DelgGeoError, OSError) as e:
            raise SystemExit(f"{path}: {e}") from None
        k, s, d = extractor.local.extract_batch([image])[0]
        kp.append(k)
        de.append(d.astype(np.float16))
        sc.append(s)
        counts.append(len(k))
    seconds = time.perf_counter() - t0
    n_ref = min(len(md), len(paths))
    np.savez(
        args.out, keypoints=np.concatenate(kp), descriptors=np.concatenate(de), scores=np.concatenate(sc),
        offsets=np.concatenate([[0], np.cumsum(counts)]), n_ref=n_ref, local=args.local,
        images_per_s=len(paths) / seconds,
    )
    print(json.dumps({"local": args.local, "images": len(paths), "seconds": round(seconds, 1),
                      "images_per_s": round(len(paths) / seconds, 2)}))


def _compact(args) -> None:
    """The cache as the compact store holds it: each reference's best ``--max-local`` features,
    their descriptors PCA-projected, int8-coded and decoded (``pca-int8``, ``--dim``), keypoints
    rounded to whole pixels; the queries' descriptors only projected (all of them), as a query is."""
    from delg_geo.index.store import fit_local_codec

    z = np.load(args.cache)
    kp, de, sc, off, n_ref = z["keypoints"], z["descriptors"], z["scores"], z["offsets"], int(z["n_ref"])

    def best(i):
        a, b = int(off[i]), int(off[i + 1])
        return a + np.sort(np.argsort(-sc[a:b], kind="stable")[: args.max_local])

    rows = np.concatenate([best(i) for i in range(n_ref)])
    rng = np.random.default_rng(0)
    sample = rows if len(rows) <= 200_000 else np.sort(rng.choice(rows, 200_000, replace=False))  # as index build trains
    codec = fit_local_codec(de[sample].astype(np.float32), "pca-int8", args.dim)
    out_kp, out_de, counts = [], [], []
    for i in range(len(off) - 1):
        if i < n_ref:
            r = best(i)
            k, d = np.rint(kp[r]), codec.decode(codec.encode(de[r]))
        else:
            k, d = kp[off[i]:off[i + 1]], codec.project(de[off[i]:off[i + 1]])
        out_kp.append(k.astype(np.float32))
        out_de.append(d.astype(np.float16))
        counts.append(len(d))
    np.savez(args.out, keypoints=np.concatenate(out_kp), descriptors=np.concatenate(out_de),
             scores=np.zeros(sum(counts), np.float32), offsets=np.concatenate([[0], np.cumsum(counts)]), n_ref=n_ref,
             local=z["local"] if "local" in z.files else "", images_per_s=0.0)
    print(json.dumps({"out": args.out, "features": int(sum(counts)), "dim": codec.dim}))


class Cache:
    def __init__(self, path):
        z = np.load(path)
        self.kp, self.de, self.off = z["keypoints"], z["descriptors"], z["offsets"]
        self.n_ref = int(z["n_ref"])

    def get(self, i, k):
        a, b = int(self.off[i]), int(self.off[i + 1])
        b = min(b, a + k)
        return self.kp[a:b], self.de[a:b].astype(np.float32)


def _verify(args) -> None:
    import pandas as pd

    from delg_geo.retrieval.verify import VerifyConfig, verify_pair

    cache = Cache(args.cache)
    cands = np.load(args.candidates)
    ids = cands["ids"][:, : args.top]
    md = pd.read_csv(Path(args.index) / "metadata.csv")
    sizes = md[["width", "height"]].to_numpy()
    qsizes = _query_sizes(args.queries)
    vc = VerifyConfig(px_threshold=args.px, ratio=args.ratio, max_features=args.max_features, min_inliers=1)
    inl = np.zeros(ids.shape, np.int32)
    t0 = time.perf_counter()
    from delg_geo.core.runtime import single_threaded_blas

    with ThreadPoolExecutor(2) as pool, single_threaded_blas():  # as a query verifies (locate.py)
        for q in range(len(ids)):
            qkp, qde = cache.get(cache.n_ref + q, args.max_features)

            def one(j, qkp=qkp, qde=qde, q=q):
                ckp, cde = cache.get(int(j), args.max_features)
                return verify_pair(qkp, qde, ckp, cde, vc, tuple(qsizes[q]), tuple(sizes[int(j)])).inliers

            inl[q] = list(pool.map(one, ids[q]))
    seconds = time.perf_counter() - t0
    np.savez(args.out, inliers=inl, px=args.px, ratio=args.ratio, max_features=args.max_features)
    print(json.dumps({"out": args.out, "pairs": int(ids.size), "ms_per_pair": round(1e3 * seconds / ids.size, 2)}))


def _matches(args) -> None:
    """Mutual nearest-neighbour matches of every (query, candidate) pair, with their distance ratio,
    so verification variants (ratio, threshold) cost only the RANSAC fits (``ransac``)."""
    cache = Cache(args.cache)
    ids = np.load(args.candidates)["ids"][:, : args.top]
    src, dst, ratio, counts = [], [], [], []
    t0 = time.perf_counter()
    for q in range(len(ids)):
        qkp, qde = cache.get(cache.n_ref + q, args.max_features)
        for j in ids[q]:
            ckp, cde = cache.get(int(j), args.max_features)
            sim = qde @ cde.T
            nn12 = np.argmax(sim, axis=1)
            nn21 = np.argmax(sim, axis=0)
            rows = np.flatnonzero(nn21[nn12] == np.arange(len(qde)))
            best = sim[rows, nn12[rows]]
            second = -np.partition(-sim[rows], 1, axis=1)[:, 1]
            r = np.sqrt(np.maximum(2 - 2 * best, 0)) / np.sqrt(np.maximum(2 - 2 * second, 1e-12))
            keep = r <= args.max_ratio
            src.append(qkp[rows[keep]])
            dst.append(ckp[nn12[rows[keep]]])
            ratio.append(r[keep].astype(np.float16))
            counts.append(int(keep.sum()))
    np.savez(args.out, src=np.concatenate(src), dst=np.concatenate(dst), ratio=np.concatenate(ratio),
             offsets=np.concatenate([[0], np.cumsum(counts)]), shape=np.array(ids.shape))
    print(json.dumps({"out": args.out, "pairs": int(ids.size), "ms_per_pair": round(1e3 * (time.perf_counter() - t0) / ids.size, 2)}))


def _ransac(args) -> None:
    """Inlier counts for each (ratio, px threshold) variant from a ``matches`` file."""
    import pandas as pd
    import pydegensac

    z = np.load(args.matches)
    src, dst, ratio, off = z["src"], z["dst"], z["ratio"], z["offsets"]
    n_q, k = (int(v) for v in z["shape"])
    ids = np.load(args.candidates)["ids"][:, :k]
    md = pd.read_csv(Path(args.index) / "metadata.csv")
    sides = md[["width", "height"]].to_numpy().max(axis=1)
    qsides = _query_sizes(args.queries).max(axis=1)
    for r_max in args.ratios:
        for px in args.px:
            inl = np.zeros((n_q, k), np.int32)
            for q in range(n_q):
                for c in range(k):
                    p = q * k + c
                    a, b = int(off[p]), int(off[p + 1])
                    m = ratio[a:b] <= r_max
                    if m.sum() < 5:
                        continue
                    th = px * max(qsides[q], sides[int(ids[q, c])]) / 500.0
                    _, mask = pydegensac.findHomography(src[a:b][m].astype(np.float64), dst[a:b][m].astype(np.float64), th, 0.999, 2000)
                    inl[q, c] = int(np.asarray(mask, bool).sum()) if mask is not None else 0
            out = f"{args.out_prefix}-r{r_max}-px{px}.npz"
            np.savez(out, inliers=inl, px=px, ratio=r_max)
            print(json.dumps({"out": out}))


def _query_sizes(queries):
    from PIL import Image, ImageOps

    from delg_geo.evaluation.queries import read_queries

    items, _ = read_queries(queries, None)
    return np.array([ImageOps.exif_transpose(Image.open(i.path)).size for i in items])


def _evaluate(args) -> None:
    """Held-out scores: settings picked on a random half of the queries, scored on the other half.

    Per inlier file, the vote settings (min inliers, base inliers, radius) are picked; with
    ``--joint``, the file (a verification variant) is picked too, on the same half."""
    from collections import Counter

    import pandas as pd

    from delg_geo.evaluation.diagnose import rule_errors_km
    from delg_geo.core.geo import haversine_km
    from delg_geo.retrieval.knn import default_sigma_km, knn_vote
    from delg_geo.evaluation.queries import read_queries

    cands = np.load(args.candidates)
    md = pd.read_csv(Path(args.index) / "metadata.csv")
    lats, lons = md["lat"].to_numpy(), md["lon"].to_numpy()
    items, _ = read_queries(args.queries, None)
    gt_lat = np.array([i.lat for i in items])
    gt_lon = np.array([i.lon for i in items])
    sigma = default_sigma_km(lats, lons)
    ids_all, sims_all = cands["ids"], cands["similarities"]
    # nothing verifies: the kernel-density vote over the whole global top-k (the default fallback)
    fb = np.array([knn_vote(lats[i], lons[i], s, sigma)[:2] for i, s in zip(ids_all, sims_all)])
    vote_grid = [(m, b, r) for m in args.min_inliers for b in args.base for r in (0.03, 0.06, 0.1)]
    errs, verified, info = {}, {}, {}
    for path in args.inliers:
        inl = np.load(path)["inliers"]
        k = inl.shape[1]
        ids, sims = ids_all[:, :k], sims_all[:, :k]
        cl, cn = lats[ids], lons[ids]
        for g in vote_grid:
            errs[path, g] = rule_errors_km(cl, cn, sims, inl, np.ones(ids.shape, bool), gt_lat, gt_lon, fb[:, 0], fb[:, 1], g)
            verified[path, g] = inl.max(axis=1) >= g[0]
        right = haversine_km(gt_lat[:, None], gt_lon[:, None], cl, cn) <= 0.1
        info[path] = {"top": k, "cand_precision": {f">={t}": round(float(right[inl >= t].mean()), 3) if (inl >= t).any() else None
                                                   for t in (10, 15, 20, 30, 50)}}
    groups = [list(errs)] if args.joint else [[key for key in errs if key[0] == p] for p in args.inliers]
    n = len(gt_lat)
    for keys in groups:
        rng = np.random.default_rng(0)
        held = {"acc25": [], "acc100": [], "acc1000": [], "median_km": [], "verified_frac": [], "verified_precision": []}
        picked = []
        for _ in range(args.repeats):
            halves = np.array_split(rng.permutation(n), 2)
            e = np.empty(n)
            v = np.empty(n, bool)
            for f in range(2):
                test, train = halves[f], halves[1 - f]

                def score(key, train=train):  # accuracy within 100 m, then precision of verified answers
                    vv = verified[key][train]
                    prec = (errs[key][train][vv] <= 0.1).mean() if vv.any() else 0.0
                    return ((errs[key][train] <= 0.1).mean(), prec)

                key = max(keys, key=score)
                picked.append((Path(key[0]).stem, key[1]))
                e[test] = errs[key][test]
                v[test] = verified[key][test]
            held["acc25"].append((e <= 0.025).mean())
            held["acc100"].append((e <= 0.1).mean())
            held["acc1000"].append((e <= 1.0).mean())
            held["median_km"].append(np.median(e))
            held["verified_frac"].append(v.mean())
            held["verified_precision"].append((e[v] <= 0.1).mean() if v.any() else 0.0)
        row = {"inliers": sorted({k[0] for k in keys}), **{kk: round(float(np.mean(vv)), 4) for kk, vv in held.items()},
               "acc100_range": [round(float(min(held["acc100"])), 4), round(float(max(held["acc100"])), 4)],
               "picked": Counter(picked).most_common(3)}
        if not args.joint:
            row.update(info[keys[0][0]])
        print(json.dumps(row))


def _throughput(args) -> None:
    """images/s of the whole extraction ``index build`` runs, per --local choice, in one run."""
    import pandas as pd

    from delg_geo.features.extract import iter_extract
    from delg_geo.features.models import get_extractor
    from delg_geo.core.runtime import configure_for_throughput

    configure_for_throughput()
    ref = pd.read_csv(Path(args.data) / "reference.csv")
    paths = [str(Path(args.data) / p) for p in ref.image.iloc[: args.n]]
    out = {}
    for local in args.locals:  # NAME, or NAME:plain for a learned type without its default settings
        name, _, plain = local.partition(":")
        ext = get_extractor(None, local=name, local_options={} if plain == "plain" else None)
        list(iter_extract(paths[:8], ext, batch_size=4))  # warm-up (tracing)
        t0 = time.perf_counter()
        n = sum(r.ok for r in iter_extract(paths, ext, batch_size=4, progress=f"build {local}"))
        out[local] = round(n / (time.perf_counter() - t0), 2)
    print(json.dumps({"images": len(paths), "images_per_s": out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--local", required=True)
    e.add_argument("--index", required=True)
    e.add_argument("--queries", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--top-k", type=int, default=1024)
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--max-side", type=int, default=1024)
    e.add_argument("--upscale", action="store_true", help="enlarge smaller images to --max-side too")
    c = sub.add_parser("compact", help="encode a cache as the compact store (index build's default) holds it")
    c.add_argument("--cache", required=True)
    c.add_argument("--max-local", type=int, default=500)
    c.add_argument("--dim", type=int, default=48)
    c.add_argument("--out", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--cache", required=True)
    v.add_argument("--candidates", required=True)
    v.add_argument("--index", required=True)
    v.add_argument("--queries", required=True)
    v.add_argument("--top", type=int, default=100)
    v.add_argument("--px", type=float, default=4.0)
    v.add_argument("--ratio", type=float, default=0.9)
    v.add_argument("--max-features", type=int, default=1024)
    v.add_argument("--out", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--candidates", required=True)
    ev.add_argument("--index", required=True)
    ev.add_argument("--queries", required=True)
    ev.add_argument("--inliers", nargs="+", required=True)
    ev.add_argument("--min-inliers", type=int, nargs="+", default=[8, 10, 12, 15, 20, 25, 30])
    ev.add_argument("--base", type=int, nargs="+", default=[0, 4, 6, 8, 10, 12, 15])
    ev.add_argument("--repeats", type=int, default=10)
    ev.add_argument("--joint", action="store_true", help="pick the inlier file (variant) on the tuning half too")
    mt = sub.add_parser("matches")
    mt.add_argument("--cache", required=True)
    mt.add_argument("--candidates", required=True)
    mt.add_argument("--top", type=int, default=100)
    mt.add_argument("--max-features", type=int, default=1024)
    mt.add_argument("--max-ratio", type=float, default=0.95)
    mt.add_argument("--out", required=True)
    rs = sub.add_parser("ransac")
    rs.add_argument("--matches", required=True)
    rs.add_argument("--candidates", required=True)
    rs.add_argument("--index", required=True)
    rs.add_argument("--queries", required=True)
    rs.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.95])
    rs.add_argument("--px", type=float, nargs="+", default=[4.0, 8.0, 12.0])
    rs.add_argument("--out-prefix", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--data", required=True, help="the Venice folder (reference.csv, images/)")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--locals", nargs="+", default=["delg", "xfeat", "aliked-n16", "aliked-n16:plain"],
                   help="NAME:plain: without the type's default settings (aliked-n16: not enlarged)")
    args = ap.parse_args()
    {"extract": _extract, "compact": _compact, "verify": _verify, "matches": _matches, "ransac": _ransac, "evaluate": _evaluate,
     "throughput": _throughput}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Compare local-feature types for verification on a benchmark, without rebuilding indexes.

Two steps, so variants can be compared in seconds once the features are cached:

1. ``extract``: one local-feature type (``delg`` | ``xfeat`` | ``aliked-n16``) for every image of
   an index and every query, into one ``.npz`` (keypoints in original-image pixels, float16
   descriptors, per-image offsets), with the extraction throughput.

       python tools/compare_local.py extract --local xfeat --index runs/venice-index \\
           --queries ../shared/data/venice/queries.csv --out runs/local-cache/xfeat.npz

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

    from delg_geo.extract import iter_extract
    from delg_geo.models.local_features import LearnedLocal, load_local_for_cache
    from delg_geo.queries import read_queries

    md = pd.read_csv(Path(args.index) / "metadata.csv")
    items, _ = read_queries(args.queries, None)
    paths = list(md["path"]) + [str(i.path) for i in items]
    if args.limit:
        paths = paths[: args.limit]
    extractor = load_local_for_cache(args.local, top_k=args.top_k)
    kp, de, sc, counts = [], [], [], []
    t0 = time.perf_counter()
    for res in iter_extract(paths, extractor, batch_size=1, progress="extract"):
        if not res.ok:
            raise SystemExit(res.error)
        f = res.features
        kp.append(f.keypoints)
        de.append(f.local_descriptors.astype(np.float16))
        sc.append(f.scores)
        counts.append(f.num_local)
    seconds = time.perf_counter() - t0
    n_ref = min(len(md), len(paths))
    np.savez(
        args.out, keypoints=np.concatenate(kp), descriptors=np.concatenate(de), scores=np.concatenate(sc),
        offsets=np.concatenate([[0], np.cumsum(counts)]), n_ref=n_ref, local=args.local,
        images_per_s=len(paths) / seconds,
    )
    print(json.dumps({"local": args.local, "images": len(paths), "seconds": round(seconds, 1),
                      "images_per_s": round(len(paths) / seconds, 2)}))


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

    from delg_geo.verify import VerifyConfig, verify_pair

    cache = Cache(args.cache)
    cands = np.load(args.candidates)
    ids = cands["ids"][:, : args.top]
    md = pd.read_csv(Path(args.index) / "metadata.csv")
    sizes = md[["width", "height"]].to_numpy()
    qsizes = _query_sizes(args.queries)
    vc = VerifyConfig(px_threshold=args.px, ratio=args.ratio, max_features=args.max_features, min_inliers=1)
    inl = np.zeros(ids.shape, np.int32)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for q in range(len(ids)):
            qkp, qde = cache.get(cache.n_ref + q, args.max_features)

            def one(j, qkp=qkp, qde=qde, q=q):
                ckp, cde = cache.get(int(j), args.max_features)
                return verify_pair(qkp, qde, ckp, cde, vc, tuple(qsizes[q]), tuple(sizes[int(j)])).inliers

            inl[q] = list(pool.map(one, ids[q]))
    seconds = time.perf_counter() - t0
    np.savez(args.out, inliers=inl, px=args.px, ratio=args.ratio, max_features=args.max_features)
    print(json.dumps({"out": args.out, "pairs": int(ids.size), "ms_per_pair": round(1e3 * seconds / ids.size, 2)}))


def _query_sizes(queries):
    from PIL import Image, ImageOps

    from delg_geo.queries import read_queries

    items, _ = read_queries(queries, None)
    return np.array([ImageOps.exif_transpose(Image.open(i.path)).size for i in items])


def _evaluate(args) -> None:
    import pandas as pd

    from delg_geo.diagnose import rule_errors_km
    from delg_geo.geo import haversine_km
    from delg_geo.knn import default_sigma_km, knn_vote
    from delg_geo.queries import read_queries

    cands = np.load(args.candidates)
    md = pd.read_csv(Path(args.index) / "metadata.csv")
    lats, lons = md["lat"].to_numpy(), md["lon"].to_numpy()
    items, _ = read_queries(args.queries, None)
    gt_lat = np.array([i.lat for i in items])
    gt_lon = np.array([i.lon for i in items])
    sigma = default_sigma_km(lats, lons)
    ids_all, sims_all = cands["ids"], cands["similarities"]
    fb = np.array([knn_vote(lats[i], lons[i], s, sigma)[:2] for i, s in zip(ids_all, sims_all)])
    rng_seed = 0
    grid = [(m, b, r) for m in args.min_inliers for b in args.base for r in (0.03, 0.06, 0.1)]
    rows = []
    for path in args.inliers:
        z = np.load(path)
        inl = z["inliers"]
        k = inl.shape[1]
        ids, sims = ids_all[:, :k], sims_all[:, :k]
        if k < ids_all.shape[1]:  # candidates beyond the verified ones count as 0 inliers
            pass
        valid = np.ones(ids.shape, bool)
        cl, cn = lats[ids], lons[ids]
        errs = {g: rule_errors_km(cl, cn, sims, inl, valid, gt_lat, gt_lon, fb[:, 0], fb[:, 1], g) for g in grid}
        verified = {g: inl.max(axis=1) >= g[0] for g in grid}
        rng = np.random.default_rng(rng_seed)
        held = {"acc25": [], "acc100": [], "acc1000": [], "median": [], "ver_frac": [], "ver_prec": []}
        picked = []
        for _ in range(args.repeats):
            perm = rng.permutation(len(inl))
            halves = np.array_split(perm, 2)
            e = np.empty(len(inl))
            v = np.empty(len(inl), bool)
            for f in range(2):
                test, train = halves[f], halves[1 - f]
                # tune for accuracy within 100 m; ties broken by precision of verified answers
                def key(g):
                    vv = verified[g][train]
                    prec = (errs[g][train][vv] <= 0.1).mean() if vv.any() else 0.0
                    return ((errs[g][train] <= 0.1).mean(), prec)

                g = max(grid, key=key)
                picked.append(g)
                e[test] = errs[g][test]
                v[test] = verified[g][test]
            held["acc25"].append((e <= 0.025).mean())
            held["acc100"].append((e <= 0.1).mean())
            held["acc1000"].append((e <= 1.0).mean())
            held["median"].append(np.median(e))
            held["ver_frac"].append(v.mean())
            held["ver_prec"].append((e[v] <= 0.1).mean() if v.any() else 0.0)
        row = {"inliers": path, "top": k, **{kk: round(float(np.mean(vv)), 4) for kk, vv in held.items()}}
        from collections import Counter

        row["picked"] = Counter(picked).most_common(3)
        # each candidate's precision by inlier count (all candidates pooled)
        right = haversine_km(gt_lat[:, None], gt_lon[:, None], cl, cn) <= 0.1
        row["cand_precision"] = {f">={t}": round(float(right[inl >= t].mean()), 3) if (inl >= t).any() else None
                                 for t in (10, 15, 20, 30, 50)}
        rows.append(row)
        print(json.dumps(row))


def _throughput(args) -> None:
    """images/s of the whole extraction ``index build`` runs, per --local choice, in one run."""
    import pandas as pd

    from delg_geo.extract import iter_extract
    from delg_geo.models import get_extractor
    from delg_geo.runtime import configure_for_throughput

    configure_for_throughput()
    ref = pd.read_csv(Path(args.data) / "reference.csv")
    paths = [str(Path(args.data) / p) for p in ref.image.iloc[: args.n]]
    out = {}
    for local in args.locals:
        ext = get_extractor(None, local=local)
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
    t = sub.add_parser("throughput")
    t.add_argument("--data", required=True, help="the Venice folder (reference.csv, images/)")
    t.add_argument("--n", type=int, default=200)
    t.add_argument("--locals", nargs="+", default=["delg", "xfeat", "aliked-n16"])
    args = ap.parse_args()
    {"extract": _extract, "verify": _verify, "evaluate": _evaluate, "throughput": _throughput}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Shortlist recall on the collection's own photos: how often a right photo reaches verification.

Verification can only confirm a photo of the right place that the search hands it. This tool
measures that, on the index's own photos, never on a query set: a seeded sample of the photos
(seed 1 by default, not calibration's 0) is searched from its stored features, its
near-duplicates left out as calibration leaves them out (delg_geo/retrieval/calibrate.py), and for each one
that has a right photo in the index (within ``--radius-km``) it records the rank of the first
one among

* the global search's results (``global``),
* the ASMK inverted file's, under each ``--kernel ALPHA,TAU`` asked for (``asmk a=3 t=0`` is the
  index's own unless its manifest says otherwise),
* the shortlist a query verifies: the global top-``--top-k`` and the ASMK top-``--local-top-k``
  (``shortlist``, under the index's own kernel).

``--first N`` samples only the index's first N photos (the real photos of a ``bench_scale.py``
copy, whose distractors have no photo to query with) and reads only their metadata rows.
Prints recall at each ``--k`` as a table, or one JSON object with ``--json``::

    python tools/shortlist_recall.py --index runs/scale1m/index-1000000 --first 1898 --sample 200 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_kernel(text: str) -> tuple[float, float]:
    try:
        a, t = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kernel {text!r}: expected ALPHA,TAU such as 3,0") from None
    if a <= 0 or not -1 <= t < 1:
        raise argparse.ArgumentTypeError(f"--kernel {text!r}: ALPHA must be positive and TAU in [-1, 1)")
    return a, t


def first_rank(ranked: np.ndarray, right: np.ndarray) -> int:
    """Position of the first id of ``right`` in ``ranked`` (len(ranked) when absent)."""
    pos = np.flatnonzero(np.isin(ranked, right))
    return int(pos[0]) if len(pos) else len(ranked)


def recall(index_dir: Path, *, sample: int = 200, seed: int = 1, radius_km: float = 0.1, first: int = 0,
           ks=(1, 10, 100, 300), kernels=(), top_k: int = 100, local_top_k: int | None = None,
           progress: bool = False) -> dict:
    import pandas as pd

    from delg_geo.index.asmk import InvertedFile
    from delg_geo.retrieval.calibrate import near_duplicates, photo_keys, pinned_geotags, query_settings, sample_ids
    from delg_geo.core.geo import haversine_km
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.search import local_candidates, shortlist

    index = GeoIndex(index_dir, device="cpu")
    n_all = len(index)
    n = min(int(first), n_all) if first else n_all
    meta = pd.read_csv(index.path / "metadata.csv", nrows=n) if first else index.metadata
    lats, lons = index.lats[:n].astype(np.float64), index.lons[:n].astype(np.float64)
    keys = photo_keys(meta)
    qids = sample_ids(n, sample, seed, ~pinned_geotags(lats, lons, keys))
    max_features = query_settings(index)[0].max_features  # what a query and calibration match with
    asmk = index.asmk
    own = (asmk.alpha, asmk.tau) if asmk is not None else None
    kernels = [tuple(k) for k in kernels] or ([own] if own else [])
    if asmk is None and kernels:
        raise SystemExit(f"{index_dir} has no ASMK inverted file: leave out --kernel")
    k_max = max(ks)
    local_k = int(top_k if local_top_k is None else local_top_k) if asmk is not None else 0
    names = ["global"] + [f"asmk a={a:g} t={t:g}" for a, t in kernels] + (["shortlist"] if asmk is not None else [])
    ranks = {m: [] for m in names}
    # one inverted file per kernel tried (the same arrays, another alpha and tau): the index's own is left as it is
    tried = {(a, t): InvertedFile(index.path, n_all, {**index.manifest.asmk, "alpha": a, "tau": t}) for a, t in kernels}
    t0 = time.perf_counter()
    from tqdm import tqdm

    for qi in tqdm(qids, desc="self-queries", disable=not progress):
        drop = near_duplicates(int(qi), lats, lons, keys)
        right = np.setdiff1d(np.flatnonzero(haversine_km(lats[qi], lons[qi], lats, lons) <= radius_km), drop)
        if len(right) == 0:
            continue
        qw = index.global_rows(np.array([qi]))
        g = shortlist(index, qw, None, max(k_max, top_k), 0, exclude=drop).ids  # the global search, once
        ranks["global"].append(first_rank(g[:k_max], right))
        q_desc = index.local_features(int(qi))[1][:max_features] if asmk is not None else None
        for (a, t), inv in tried.items():
            a_ids, _ = inv.search(q_desc, k_max, exclude=drop)
            ranks[f"asmk a={a:g} t={t:g}"].append(first_rank(a_ids, right))
        if asmk is not None:  # what a query verifies: shortlist() over the global top-k found above
            extra = local_candidates(index, qw, q_desc, local_k, np.concatenate([drop, g[:top_k]])).ids
            hit = np.isin(np.concatenate([g[:top_k], extra]), right).any()
            ranks["shortlist"].append(0 if hit else k_max)  # in it or not: it is verified whole
    counted = len(ranks["global"])
    out = dict(index=str(index_dir), images=n_all, sampled=int(len(qids)), with_a_right_photo=counted,
               radius_km=radius_km, first=n, seed=seed, top_k=top_k, local_top_k=local_k,
               seconds=round(time.perf_counter() - t0, 1), recall={})
    for m in names:
        r = np.asarray(ranks[m])
        out["recall"][m] = ({f"top{k}": float((r < k).mean()) for k in ks} if m != "shortlist"
                            else {"in_shortlist": float((r == 0).mean())}) if counted else {}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--sample", type=int, default=200, help="photos sampled as self-queries")
    ap.add_argument("--seed", type=int, default=1, help="the sample's seed (calibration samples with 0)")
    ap.add_argument("--radius-km", type=float, default=0.1, help="a photo this close is right")
    ap.add_argument("--first", type=int, default=0, help="sample only the first N photos (a bench_scale copy's real ones)")
    ap.add_argument("--k", default="1,10,100,300", help="the ranks recall is counted at")
    ap.add_argument("--kernel", type=parse_kernel, action="append", default=[],
                    help="ASMK ALPHA,TAU to try (repeat it; default: the index's own)")
    ap.add_argument("--top-k", type=int, default=100, help="the shortlist's global candidates")
    ap.add_argument("--local-top-k", type=int, default=None, help="the shortlist's ASMK candidates (default: as many)")
    ap.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    args = ap.parse_args(argv)
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        ap.error(f"--k {args.k!r}: ranks separated by commas, such as 1,10,100")
    if min(ks) < 1:
        ap.error("--k: ranks from 1 up, such as 1,10,100")
    if args.sample < 1 or args.radius_km <= 0:
        ap.error("--sample must be at least 1 and --radius-km positive")
    res = recall(args.index, sample=args.sample, seed=args.seed, radius_km=args.radius_km, first=args.first, ks=ks,
                 kernels=args.kernel, top_k=args.top_k, local_top_k=args.local_top_k, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['with_a_right_photo']} of {res['sampled']} self-queries have a right photo within "
              f"{res['radius_km'] * 1000:g} m ({res['images']} images, {res['seconds']} s)")
        for m, r in res["recall"].items():
            print(f"  {m:>20}  " + "  ".join(f"{k} {100 * v:5.1f} %" for k, v in r.items()))
    return res


if __name__ == "__main__":
    main()

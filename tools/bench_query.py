"""Benchmark: query latency per stage and index size per image, on a built index.

    python tools/bench_query.py --index runs/venice-index --queries ../shared/data/venice/queries.csv [--top-k 100]

Runs every query through ``Geolocator.locate`` one at a time (the latency a user sees), with and
without verification, and reports ms per stage (median and mean), ms per verified candidate,
accuracy within 25 m / 100 m / 250 m / 1 km and the median error for both, and the index's bytes
per image split into global, local and metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def index_bytes_per_image(index_dir: Path, manifest) -> dict:
    n = manifest.num_images
    size = lambda *names: sum((index_dir / f).stat().st_size for f in names if (index_dir / f).exists())  # noqa: E731
    out = {  # format 2 (compact) and format 1 file names alike: whichever the index has
        "global (vectors, faiss, whitening, raw)": size("global.npy", "global.faiss", "global_raw.npy", "whitening.npz") / n,
        "global search index only (global.faiss)": size("global.faiss") / n,
        "local (keypoints, codes or descriptors, scores, offsets, codec)": size(
            "local_keypoints.npy", "local_codes.npy", "local_codec.npz", "local_descriptors.npy", "local_scores.npy",
            "local_offsets.npy") / n,
        "metadata (metadata.csv, manifest.json, skipped.csv)": size("metadata.csv", "manifest.json", "skipped.csv") / n,
        "inverted file (asmk_*: entries, counts, offsets, codebook)": size(
            "asmk_ids.npy", "asmk_sigs.npy", "asmk_counts.npy", "asmk_offsets.npy", "asmk_codebook.npz") / n,
    }
    out["total"] = sum(v for k, v in out.items() if "only" not in k)
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(argv)

    from delg_geo.core.geo import haversine_km
    from delg_geo.features.images import load_image
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.evaluation.queries import read_queries

    items, skipped = read_queries(args.queries, args.images)
    if args.limit:
        items = items[: args.limit]
    geo = Geolocator.from_index(args.index, config=LocateConfig(top_k=args.top_k, places=False))
    glob = Geolocator(geo.index, geo.extractor, LocateConfig(top_k=args.top_k, verify=False, places=False))
    geo.locate(load_image(items[0].path, max_side=geo.extractor.max_side))  # warm-up
    rows = []
    for it in items:
        img = load_image(it.path, max_side=geo.extractor.max_side)
        t0 = time.perf_counter()
        feats = geo.extractor.extract(img)  # once, shared by both answers
        extract_ms = (time.perf_counter() - t0) * 1e3
        pv = geo.locate_features(feats, str(it.path), extract_ms=extract_ms)
        pg = glob.locate_features(feats, str(it.path))
        rows.append(dict(
            verified_km=haversine_km(it.lat, it.lon, pv.lat, pv.lon), global_km=haversine_km(it.lat, it.lon, pg.lat, pg.lon),
            method=pv.method, inliers=pv.inliers, candidates=pv.candidates, **{f"{k}_ms": v for k, v in pv.timings_ms.items()},
        ))
    df = pd.DataFrame(rows)

    def acc(col):
        e = df[col].to_numpy() * 1000
        return {"within_25m": round(float((e <= 25).mean() * 100), 1), "within_100m": round(float((e <= 100).mean() * 100), 1),
                "within_250m": round(float((e <= 250).mean() * 100), 1), "within_1km": round(float((e <= 1000).mean() * 100), 1),
                "median_m": round(float(np.median(e)), 1)}

    out = {
        "queries": len(df),
        "skipped": len(skipped),
        "top_k": min(args.top_k, len(geo.index)),
        "candidates_per_query": round(float(df["candidates"].mean()), 1),  # the global top-k and the inverted file's
        "ms_per_query": {s: {"median": round(float(df[f"{s}_ms"].median()), 1), "mean": round(float(df[f"{s}_ms"].mean()), 1)}
                         for s in ("extract", "search", "verify")},
        "verify_ms_per_candidate": round(float(df["verify_ms"].sum()) / max(1, int(df["candidates"].sum())), 2),
        "verified_fraction": round(float((df.method == "verified").mean()), 3),
        "accuracy_verified": acc("verified_km"),
        "accuracy_global_only": acc("global_km"),
        "bytes_per_image": index_bytes_per_image(args.index, geo.index.manifest),
    }
    out["verify_gain_at_100m_points"] = round(out["accuracy_verified"]["within_100m"] - out["accuracy_global_only"]["within_100m"], 1)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

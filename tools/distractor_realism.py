"""How realistic are bench_scale's synthetic distractors? Global descriptors only, in a minute.

    python tools/distractor_realism.py --index INDEX --queries QUERIES.csv --images DIR \
        [--elsewhere ../shared/data/exif_gps] [--distractors 1000000] [--json]

bench_scale draws every distractor's global vector from a Gaussian mixture fitted to the index's
own (Venice) vectors, wherever the distractor is placed. This tool asks how that compares with
real photos taken elsewhere, and what it does to retrieval:

* **Log-likelihood under the mixture** (how Venice-like a vector is): of the index's photos (the
  mixture was fitted on them), of the held-out queries (real Venice photos it never saw), of
  samples from the mixture (bench_scale's distractors), of "rotated" samples (the same mixture
  with its residual around the mean turned by a random rotation: a place with Venice's
  statistics that is not Venice), and of the real photos in ``--elsewhere`` (other cities).
* **Similarity to the queries** of each population (mean, spread, 99th percentile).
* **Retrieval under N distractors** of each kind: the share of queries with a photo within
  100 m among the global top 1 / 10 / 100 of the real photos plus N distractors (exact search,
  no verification), next to the share without distractors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_scale import _mixture, _sample, log, random_rotation  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".heic", ".tif", ".tiff", ".webp"}


def mixture_loglik(mix, x: np.ndarray) -> np.ndarray:
    """Log-density (up to a constant) of each row of ``x`` under the mixture."""
    w, means, chols = mix
    x = np.asarray(x, np.float64)
    out = []
    for c in range(len(w)):
        L = chols[c].astype(np.float64)
        z = np.linalg.solve(L, (x - means[c]).T).T
        out.append(np.log(w[c]) - 0.5 * (z**2).sum(1) - np.log(np.diag(L)).sum())
    out = np.stack(out, 1)
    m = out.max(1)
    return m + np.log(np.exp(out - m[:, None]).sum(1))


def rotated(x: np.ndarray, mean: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    y = mean + (x - mean) @ rotation.T
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def describe(index_dir: Path, queries: Path, images: Path | None, elsewhere: Path | None, n: int, seed: int = 0,
             limit: int = 0) -> dict:
    from delg_geo.core.geo import haversine_km
    from delg_geo.features.images import load_image
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.evaluation.queries import read_queries

    geo = Geolocator.from_index(index_dir, config=LocateConfig(places=False), device="cpu")
    index = geo.index
    g = index.search_vectors()
    wh = index.whitening

    def describe_images(paths):
        ex = geo.extractor
        return wh.apply(np.stack([ex.extract(load_image(p, max_side=ex.max_side)).global_descriptor for p in paths])).astype(np.float32)

    items, _ = read_queries(queries, images)
    items = items[:limit] if limit else items
    log(f"extracting {len(items)} queries")
    q = describe_images([it.path for it in items])
    other = None
    if elsewhere is not None and elsewhere.is_dir():
        paths = sorted(p for p in elsewhere.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        log(f"extracting {len(paths)} photos from elsewhere ({elsewhere})")
        other = describe_images(paths) if paths else None

    rng = np.random.default_rng(seed)
    mix = _mixture(g, 16, seed)
    mean = g.mean(0)
    rotations = [random_rotation(g.shape[1], 1000 + i) for i in range(16)]
    pops = {"index photos (fitted on)": g, "queries (held-out Venice)": q,
            "look-alike samples (bench_scale)": _sample(rng, mix, 5000),
            "rotated samples": np.concatenate([rotated(_sample(rng, mix, 500), mean, r) for r in rotations[:10]])}
    if other is not None:
        pops[f"real photos elsewhere ({len(other)})"] = other
    out: dict = dict(index=str(index_dir), queries=len(q), population={})
    for name, x in pops.items():
        ll = mixture_loglik(mix, x)
        s = q @ x.T
        if x is q:  # the queries among themselves: not each with itself
            s = s[~np.eye(len(q), dtype=bool)]
        out["population"][name] = dict(loglik_median=round(float(np.median(ll)), 1),
                                       loglik_p10=round(float(np.quantile(ll, 0.1)), 1),
                                       loglik_p90=round(float(np.quantile(ll, 0.9)), 1),
                                       sim_mean=round(float(s.mean()), 4), sim_sd=round(float(s.std()), 4),
                                       sim_p99=round(float(np.quantile(s, 0.99)), 4))

    lats, lons = np.array([it.lat for it in items]), np.array([it.lon for it in items])
    right = haversine_km(lats[:, None], lons[:, None], index.lats[None], index.lons[None]) <= 0.1
    has = right.any(1)
    s = q @ g.T
    best_right = np.where(right, s, -9.0).max(1)

    def recall(top):  # top: (nq, >= 100) best distractor similarities, best first
        allk = -np.sort(-np.concatenate([top, s], 1), 1)
        return {f"top{k}": round(float((has & (best_right >= allk[:, k - 1])).mean()), 4) for k in (1, 10, 100)}

    out["retrieval"] = {"without distractors": recall(np.full((len(q), 100), -9.0, np.float32))}
    chunk = 50_000
    for kind in ("look-alike", "rotated"):
        top = np.full((len(q), 100), -9.0, np.float32)
        for j, a in enumerate(range(0, n, chunk)):
            x = _sample(rng, mix, min(chunk, n - a))
            if kind == "rotated":
                x = rotated(x, mean, rotations[j % len(rotations)])
            sx = q @ x.T
            kk = min(100, sx.shape[1])
            top = -np.sort(-np.concatenate([top, np.partition(sx, -kk, 1)[:, -kk:]], 1), 1)[:, :100]
        out["retrieval"][f"{n} {kind} distractors"] = recall(top)
        log(f"{kind}: {out['retrieval'][f'{n} {kind} distractors']}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True, help="a compact (format 2) index")
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None, help="folder the queries' paths are relative to")
    default_elsewhere = Path(__file__).resolve().parents[2] / "shared" / "data" / "exif_gps"
    ap.add_argument("--elsewhere", type=Path, default=default_elsewhere, help="real photos from other places")
    ap.add_argument("--distractors", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N queries")
    ap.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    args = ap.parse_args(argv)
    out = describe(args.index, args.queries, args.images, args.elsewhere, args.distractors, args.seed, args.limit)
    if not args.json:
        for name, d in out["population"].items():
            print(f"{name:36s} log-likelihood median {d['loglik_median']:8.1f}   similarity to the queries: "
                  f"mean {d['sim_mean']:+.4f} sd {d['sim_sd']:.4f} p99 {d['sim_p99']:.4f}")
        for name, d in out["retrieval"].items():
            print(f"{name:36s} a photo within 100 m in the global top 1 / 10 / 100: "
                  f"{d['top1']:.1%} / {d['top10']:.1%} / {d['top100']:.1%}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""Benchmark: feature-extraction throughput (images/s) on the Venice photos, and where the time goes.

    python tools/bench_extract.py [--n 200] [--model efficientnet-lite0] [--batch-size 4] [--json]

Reports the end-to-end rate through the batched, prefetching extractor (what `index build`
uses), the rate of image-by-image extraction as a baseline in the same run, and a breakdown:
JPEG decode, the network at each pyramid scale, and post-processing.
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

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "venice"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--default-threads", action="store_true", help="keep TensorFlow's default threading")
    args = ap.parse_args(argv)
    if not args.default_threads:
        from delg_geo.core.runtime import configure_for_throughput

        configure_for_throughput()

    import tensorflow as tf

    from delg_geo.features.extract import iter_extract
    from delg_geo.features.images import load_image
    from delg_geo.features.models import get_extractor

    ref = pd.read_csv(args.data / "reference.csv")
    paths = [str(args.data / p) for p in ref.image.iloc[: args.n]]
    ext = get_extractor(args.model)
    # warm-up: trace the network for the common sizes
    list(iter_extract(paths[:8], ext, batch_size=args.batch_size))

    t0 = time.perf_counter()
    results = list(iter_extract(paths, ext, batch_size=args.batch_size, progress="bench"))
    batched_s = time.perf_counter() - t0
    ok = sum(r.ok for r in results)

    n_single = min(40, len(paths))
    t0 = time.perf_counter()
    for p in paths[:n_single]:
        ext.extract(load_image(p, max_side=ext.max_side))
    single_s = time.perf_counter() - t0

    # breakdown on a sample
    sample = paths[:40]
    t0 = time.perf_counter()
    imgs = [load_image(p, max_side=ext.max_side) for p in sample]
    decode_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    per_scale = {}
    if hasattr(ext, "_full"):
        cfg = ext.config
        sizes: dict = {}
        for im in imgs:
            sizes.setdefault(im.array.shape[:2], []).append(im)
        (h, w), group = max(sizes.items(), key=lambda kv: len(kv[1]))
        batch = tf.constant(np.stack([g.array for g in group[: args.batch_size]]).astype(np.float32))
        for s in cfg.scales:
            x = tf.image.resize(batch, (round(h * s), round(w * s)))
            fn = ext._full if any(abs(s - g) < 1e-3 for g in cfg.global_scales) else ext._local
            fn(x)
            t0 = time.perf_counter()
            for _ in range(3):
                fn(x)
            per_scale[str(s)] = round((time.perf_counter() - t0) / 3 / batch.shape[0] * 1e3, 2)
    net_ms = sum(per_scale.values())
    total_ms = batched_s / len(paths) * 1e3
    share = {k: f"{v / net_ms:.0%}" for k, v in per_scale.items()} if net_ms else {}
    out = {
        "model": ext.model_id,
        "images": len(paths),
        "ok": ok,
        "cpu_count": os.cpu_count(),
        "images_per_s": round(len(paths) / batched_s, 2),
        "baseline_one_by_one_images_per_s": round(n_single / single_s, 2),
        "speedup_vs_one_by_one": round((len(paths) / batched_s) / (n_single / single_s), 2),
        "ms_per_image": round(total_ms, 1),
        "breakdown_ms_per_image": {
            "decode (overlapped with the network in the batched run)": round(decode_ms, 1),
            "network by scale (one thread)": per_scale,
            "network share by scale": share,
            "network total (one thread)": round(net_ms, 1),
            "wall per image with the cores in parallel": round(total_ms, 1),
        },
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return out


if __name__ == "__main__":
    main()

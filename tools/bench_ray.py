"""Index-build throughput: one process against Ray with 1 and 2 workers, measured in one run.

    python tools/bench_ray.py [--n 200] [--repeats 1] [--out runs/bench-ray] [--json]

Builds the same index of the first N Venice reference photos (spread over the collection) three
ways: ``build_index`` in this process (what ``index build`` does), and ``index build --ray`` on a
local Ray cluster of this machine's CPUs with 1 worker (all CPUs) and with 2 workers (half
each). Prints images/s for each, extraction only (model loaded, cluster up) and end to end (Ray:
cluster start and model loading in the workers included), and the ratios to the single process.
With ``--repeats 2`` the second round runs in reverse order (A B C C B A), so load from other
work on the machine weighs on every mode alike; the table gives each mode's mean.
The three indexes are checked to hold the same ids and images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def subset_csv(venice: Path, n: int, out: Path) -> Path:
    import pandas as pd

    ref = pd.read_csv(venice / "reference.csv")
    sub = ref.iloc[:: max(1, len(ref) // n)].head(n)
    out.mkdir(parents=True, exist_ok=True)
    sub.to_csv(out / "reference.csv", index=False)
    return out / "reference.csv"


def run_mode(mode: str, venice: Path, csv: Path, out: Path, extractor) -> dict:
    from delg_geo.core.ray_pool import RayOptions
    from index_builder.build import BuildOptions, build_index

    index_dir = out / f"index-{mode}"
    shutil.rmtree(index_dir, ignore_errors=True)
    ray = None if mode == "single" else RayOptions(workers=int(mode.split("-")[1]))
    t0 = time.perf_counter()
    # the confidence calibration after assembly (issue 10) is the same in every mode: left out here
    rep = build_index(venice, index_dir, csv, extractor=extractor, options=BuildOptions(progress=False, calibrate=False), ray=ray,
                      log=lambda m: None)
    wall = time.perf_counter() - t0
    extract_s = rep.ray["extract_s"] if rep.ray else rep.extract_seconds
    return dict(mode=mode, images=rep.added, extract_s=round(extract_s, 2), wall_s=round(wall, 2),
                images_per_s=round(rep.added / extract_s, 3), end_to_end_images_per_s=round(rep.added / wall, 3),
                startup_s=(rep.ray or {}).get("startup_s", 0.0), index=str(index_dir))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--venice", type=Path, default=REPO.parent / "shared" / "data" / "venice")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-ray"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from delg_geo.features.models import get_extractor
    from delg_geo.core.runtime import configure_for_throughput

    configure_for_throughput()  # as `delg-geo index build` does
    extractor = get_extractor()
    csv = subset_csv(args.venice, args.n, args.out)
    modes = ["single", "ray-1", "ray-2"]
    runs = []
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            res = run_mode(mode, args.venice, csv, args.out, extractor)
            runs.append(res)
            print(f"{mode}: {res['images_per_s']:.2f} images/s extracting, {res['end_to_end_images_per_s']:.2f} end to end "
                  f"({res['images']} images, {res['wall_s']:.1f} s, workers ready after {res['startup_s']:.1f} s)", file=sys.stderr)

    import numpy as np
    import pandas as pd

    md = {m: pd.read_csv(Path(args.out) / f"index-{m}" / "metadata.csv") for m in modes}
    same = all(md[m][["id", "image"]].equals(md["single"][["id", "image"]]) for m in modes)
    name = "global.npy" if (Path(args.out) / "index-single" / "global.npy").exists() else "global_raw.npy"
    g = {m: np.load(Path(args.out) / f"index-{m}" / name).astype(np.float32) for m in modes}
    max_diff = max(float(np.abs(g[m] - g["single"]).max()) for m in modes)

    mean = {m: {k: float(np.mean([x[k] for x in runs if x["mode"] == m])) for k in
                ("images_per_s", "end_to_end_images_per_s", "startup_s")} for m in modes}
    base = mean["single"]
    summary = dict(
        n=args.n, repeats=args.repeats, cpus=os.cpu_count(), runs=runs, same_ids=same, max_global_diff=max_diff,
        modes={m: dict(images_per_s=round(v["images_per_s"], 3), end_to_end_images_per_s=round(v["end_to_end_images_per_s"], 3),
                       startup_s=round(v["startup_s"], 2),
                       ratio=round(v["images_per_s"] / base["images_per_s"], 3),
                       end_to_end_ratio=round(v["end_to_end_images_per_s"] / base["end_to_end_images_per_s"], 3))
               for m, v in mean.items()},
    )
    lines = ["| mode | images/s (extraction) | ratio | images/s (end to end) | ratio | workers ready after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m, v in summary["modes"].items():
        lines.append(f"| {m} | {v['images_per_s']:.2f} | {v['ratio']:.2f} | {v['end_to_end_images_per_s']:.2f} | "
                     f"{v['end_to_end_ratio']:.2f} | {v['startup_s']:.1f} s |")
    print("\n".join(lines))
    print(f"same ids and images in all three: {same}; largest global-descriptor difference {max_diff:.2e}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

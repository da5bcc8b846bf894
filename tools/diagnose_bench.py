"""Why the verified answers of a benchmark miss: retrieval recall, a breakdown of the misses, and
the decision rule's accuracy under cross-validation.

    python tools/diagnose_bench.py runs/venice-bench --index runs/venice-index [--radius-km 0.1] [--json]

Reads ``candidates.npz`` and ``predictions.csv`` from the bench output folder (``delg-geo bench``
with the ``verified`` method writes both) and the candidates' coordinates from the index. Nothing
is re-extracted or re-verified, so it runs in seconds. See :mod:`delg_geo.evaluation.diagnose`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def diagnose(bench_dir: Path, index_dir: Path, radius_km: float = 0.1, repeats: int = 10) -> dict:
    from delg_geo.evaluation.diagnose import BenchCandidates, breakdown, correct_mask, cross_validate_rule, recall_at_k
    from delg_geo.core.errors import DelgGeoError
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.knn import default_sigma_km, knn_vote
    from delg_geo.retrieval.locate import VOTE_BASE_DEFAULTS, LocateConfig
    from delg_geo.retrieval.verify import VERIFY_DEFAULTS

    cands = BenchCandidates.load(bench_dir / "candidates.npz")
    pred = pd.read_csv(bench_dir / "predictions.csv")
    truth = pred[pred.method == "verified"].drop_duplicates("img_id").set_index("img_id")
    missing = [i for i in cands.img_id if i not in truth.index]
    if missing:
        raise DelgGeoError(f"{len(missing)} candidate rows have no verified prediction, e.g. {missing[0]}")
    gt_lat = truth.loc[cands.img_id, "gt_lat"].to_numpy(float)
    gt_lon = truth.loc[cands.img_id, "gt_long"].to_numpy(float)

    index = GeoIndex(index_dir)
    valid = cands.ids >= 0
    if cands.ids.max(initial=-1) >= len(index.lats):
        raise DelgGeoError(f"{bench_dir}: candidate ids beyond the index's {len(index.lats)} images; wrong --index?")
    safe = np.where(valid, cands.ids, 0)
    lats = np.where(valid, index.lats[safe], np.nan)
    lons = np.where(valid, index.lons[safe], np.nan)
    ok = correct_mask(lats, lons, gt_lat, gt_lon, valid, radius_km)

    # the defaults of the index's local-feature type
    local = index.manifest.local_features
    cfg = LocateConfig(verify_config=VERIFY_DEFAULTS[local], vote_base_inliers=VOTE_BASE_DEFAULTS[local])
    vc = cfg.verify_config
    sigma = default_sigma_km(index.lats, index.lons)
    fb = np.array([knn_vote(lats[i][valid[i]], lons[i][valid[i]], cands.similarities[i][valid[i]], sigma)[:2]
                   for i in range(len(gt_lat))])
    # the rule the queries used: the index's calibrated one where it has a calibration
    from delg_geo.retrieval.calibrate import load_index_calibration

    cal = load_index_calibration(index)
    rule = cal.rule.as_tuple() if cal else (vc.min_inliers, cfg.vote_base_inliers, cfg.vote_radius_km)
    cv = cross_validate_rule(lats, lons, cands.similarities, cands.inliers, valid, gt_lat, gt_lon, fb[:, 0], fb[:, 1],
                             radius_km=radius_km, default=rule,
                             repeats=repeats)
    bd = breakdown(cands.inliers, ok, vc.min_inliers)
    right = cands.inliers[ok]
    wrong = cands.inliers[valid & ~ok]
    return {
        "n_queries": int(len(gt_lat)),
        "radius_km": radius_km,
        "recall_at_k": recall_at_k(ok),
        "breakdown": asdict(bd),
        "breakdown_fractions": bd.fractions(),
        "inliers_median_right": float(np.median(right)) if right.size else None,
        "inliers_median_wrong": float(np.median(wrong)) if wrong.size else None,
        "cross_validation": asdict(cv),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir", type=Path)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--radius-km", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    from delg_geo.core.errors import DelgGeoError

    try:
        rep = diagnose(a.bench_dir, a.index, a.radius_km, a.repeats)
    except DelgGeoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        rep["cross_validation"].pop("picked")
        print(json.dumps(rep, indent=2))
        return 0
    r = a.radius_km * 1000
    print(f"{rep['n_queries']} queries; right = within {r:.0f} m of the truth")
    print("retrieval recall: " + ", ".join(f"@{k} {v:.1%}" for k, v in rep["recall_at_k"].items()))
    print(f"median inliers: right candidates {rep['inliers_median_right']}, wrong {rep['inliers_median_wrong']}")
    for k, v in rep["breakdown_fractions"].items():
        print(f"  {k.replace('_', ' '):24s} {rep['breakdown'][k]:5d}  {v:6.1%}")
    cv = rep["cross_validation"]
    print(f"vote settings (min_inliers, base, radius_km), {cv['grid_size']} tried:")
    print(f"  default {cv['default_accuracy']:.1%}; best in-sample {tuple(cv['in_sample_best'])} {cv['in_sample_accuracy']:.1%}")
    print(f"  {cv['folds']}-fold cross-validation x{cv['repeats']}: {cv['mean_accuracy']:.1%} "
          f"(min {cv['min_accuracy']:.1%}, max {cv['max_accuracy']:.1%}), median error {cv['mean_median_km'] * 1000:.0f} m")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Heavy real-data runs, outside the default test run: ``python -m pytest -m benchmark``.

They report numbers (printed as JSON) and check the targets the README states; they are not
timed unit tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared_path

pytestmark = pytest.mark.benchmark


def test_extraction_throughput():
    """What `index build` runs by default (the global pyramid plus ALIKED-n16 on photos enlarged to
    1024 px), against the model's own local features (`--local delg`) in the same run."""
    shared_path("venice")
    sys.path.insert(0, str(REPO / "tools"))
    import bench_extract
    from delg_geo.features.models.local_features import default_local
    from delg_geo.features.models.local_weights import find_weights

    default = default_local()
    if find_weights(default) is None:
        pytest.skip(f"the {default} weights (the default local features) are not installed")
    out = bench_extract.main(["--n", "200", "--json"])
    assert out["local"] == default and out["ok"] == 200 and out["compared"]["ok"] == 200
    assert out["compared"]["images_per_s"] >= 5.0, out  # README target on 2 cores for --local delg
    assert out["throughput_ratio_to_compared"] >= 0.8, out  # issue 18: the default at 0.8x --local delg or better


def test_venice_end_to_end(tmp_path):
    """The whole Venice run (index build + every method), under 30 minutes on 2 cores."""
    data = shared_path("venice")
    env_out = tmp_path / "runs"
    env = dict(os.environ, OUT=str(env_out))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's delg-geo
    r = subprocess.run(["bash", str(REPO / "tools" / "venice_report.sh"), str(data)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((env_out / "venice-bench" / "summary.json").read_text())
    m = summary["methods"]
    print(json.dumps({k: v["accuracy_at_km"]["0.1"] for k, v in m.items()}))
    assert m["verified"]["accuracy_at_km"]["0.1"] > m["global"]["accuracy_at_km"]["0.1"]
    assert m["verified"]["accuracy_at_km"]["0.1"] > m["classifier"]["accuracy_at_km"]["0.1"]
    assert m["oracle"]["accuracy_at_km"]["0.1"] >= 0.97
    # the build calibrated the confidence on the collection; on the held-out queries it meets
    # issue 10's targets (README, the default index: ECE 0.064; >= 0.5 for 43.6 % of queries, 77.1 % of them right)
    cal = summary["calibration"]
    print(json.dumps({k: cal[k] for k in ("ece", "precision_at", "coverage_at")}))
    assert cal["calibrated"] is True and cal["ece"] <= 0.08
    assert cal["precision_at"]["0.5"] >= 0.65 and cal["coverage_at"]["0.5"] >= 0.25
    # issue 10's accuracy target, with the default local features (aliked-n16 on enlarged photos)
    # and the rule the build fitted on the collection (README: 47.7 %; RANSAC moves a run by ~1 point)
    assert m["verified"]["accuracy_at_km"]["0.1"] >= 0.46
    # the diagnosis ran on the same bench output: its numbers agree with the summary
    sys.path.insert(0, str(REPO / "tools"))
    from diagnose_bench import diagnose

    rep = diagnose(env_out / "venice-bench", env_out / "venice-index")
    print(json.dumps({k: rep[k] for k in ("recall_at_k", "breakdown")}))
    assert rep["recall_at_k"][1] == pytest.approx(m["global"]["accuracy_at_km"]["0.1"])
    assert rep["cross_validation"]["default_accuracy"] == pytest.approx(m["verified"]["accuracy_at_km"]["0.1"])
    assert rep["recall_at_k"][100] >= 0.75  # the head-room re-ranking works with (README: 82 %)
    assert "cross-validation" in (env_out / "venice-diagnosis.txt").read_text()

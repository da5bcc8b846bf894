"""Benchmark (excluded from the default run; `pytest -m benchmark tests/test_bench_serve.py`):
latency of `delg-geo serve` under concurrent uploads, via tools/bench_serve.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs fastapi/uvicorn: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="needs fastapi/uvicorn: pip install -e '.[test]'")

from _tiny_index import tiny_geo  # noqa: E402,F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.benchmark
def test_bench_serve_latency(tiny_geo, tmp_path):
    geo, ref, venice = tiny_geo
    import pandas as pd

    queries = pd.read_csv(venice / "queries.csv").head(24)
    # queries.csv image paths are relative to venice/: hand over absolute ones
    pd.DataFrame({"path": [str(venice / p) for p in queries.image]}).to_csv(tmp_path / "q.csv", index=False)
    cmd = [sys.executable, str(REPO / "tools" / "bench_serve.py"), "--index", str(geo.index.path),
           "--requests", "24", "--concurrency", "4", "--time-limit", "240", "--images", str(tmp_path / "q.csv")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=2))
    assert out["errors"] == 0 and out["ok"] == 24
    assert out["p50_ms"] > 0 and out["p95_ms"] >= out["p50_ms"]

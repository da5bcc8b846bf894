"""A tiny real index (20 Venice reference photos) and a Geolocator over it, built once per session.

Used by the map, serve and browser tests. The extractor runs three scales instead of the
official seven, which keeps the build to a few seconds on two cores.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import shared_path

N_REFERENCE = 20
SCALES = (0.7071, 1.0, 1.4142)

_lock = threading.Lock()
_cache: dict = {}


def venice_dir() -> Path:
    return shared_path("venice")


def tiny_index(tmp_root: Path):
    """(geolocator, reference DataFrame, venice dir); skips without ../shared/data."""
    venice = venice_dir()
    with _lock:
        if "geo" not in _cache:
            import pandas as pd

            from delg_geo.index.geo_index import GeoIndex
            from delg_geo.retrieval.locate import Geolocator
            from delg_geo.features.models.lite_delg import LiteDelgExtractor
            from index_builder.build import BuildOptions, build_index

            ref = pd.read_csv(venice / "reference.csv")
            # Spread over the collection: every 95th photo.
            sub = ref.iloc[:: max(1, len(ref) // N_REFERENCE)].head(N_REFERENCE).reset_index(drop=True)
            tmp_root.mkdir(parents=True, exist_ok=True)
            csv = tmp_root / "tiny_reference.csv"
            sub.to_csv(csv, index=False)
            ext = LiteDelgExtractor(scales=SCALES)
            build_index(venice, tmp_root / "index", csv, extractor=ext,
                        options=BuildOptions(progress=False), log=lambda m: None)
            _cache["geo"] = Geolocator(GeoIndex(tmp_root / "index"), ext)
            _cache["ref"] = sub
        return _cache["geo"], _cache["ref"], venice


@pytest.fixture(scope="session")
def tiny_geo(tmp_path_factory):
    return tiny_index(tmp_path_factory.mktemp("tiny_index"))

"""Shared fixtures. Real-data tests find ../shared/data beside the repository and skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: this real-data test needs ../shared/data beside the repository")
    return p


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep the converted-weights cache out of the user's home during tests."""
    home = tmp_path_factory.mktemp("delg_home")
    old = os.environ.get("DELG_GEO_HOME")
    os.environ["DELG_GEO_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DELG_GEO_HOME", None)
    else:
        os.environ["DELG_GEO_HOME"] = old


@pytest.fixture(scope="session")
def lite_extractor():
    from delg_geo.features.models import get_extractor

    return get_extractor("efficientnet-lite0")

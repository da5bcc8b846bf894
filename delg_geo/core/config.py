"""Locations on disk, all overridable through the environment."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache folder: ``$DELG_GEO_HOME`` or ``~/.cache/delg-geo``."""
    env = os.environ.get("DELG_GEO_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "delg-geo"


def models_dir() -> Path:
    return home() / "models"


def default_index() -> Path | None:
    env = os.environ.get("DELG_GEO_INDEX")
    return Path(env).expanduser() if env else None

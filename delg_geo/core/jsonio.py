"""JSON for the numpy values and paths that results carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, and paths."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)

"""JSON for the numpy values and paths that results carry, and never a bare NaN or Infinity.

Python's ``json`` writes ``float("nan")`` as ``NaN``, which is not JSON: a strict reader (a
browser's ``JSON.parse``, ``jq``) refuses the whole document. :func:`dumps` is what delg-geo
prints and writes: numpy values become plain numbers and lists, paths strings, and every
non-finite float ``null``; it then encodes with ``allow_nan=False``, so a non-finite number that
got past the clean-up fails loudly instead of writing invalid JSON.
"""

from __future__ import annotations

import json
import math
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


def finite_only(o):
    """A copy of ``o`` (dicts, lists, tuples, numpy values) in which every NaN or infinite float
    is None; numpy scalars and arrays become plain Python numbers and lists."""
    if isinstance(o, bool) or o is None or isinstance(o, (str, int)) and not isinstance(o, np.integer):
        return o
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return finite_only(o.tolist())
    if isinstance(o, dict):
        return {k: finite_only(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_only(v) for v in o]
    return o


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with numpy values and paths converted and NaN/Infinity as null
    (see the module docstring); ``kwargs`` go to ``json.dumps`` (``indent``, ``sort_keys`` ...)."""
    kwargs.setdefault("default", json_default)
    return json.dumps(finite_only(obj), allow_nan=False, **kwargs)

"""The manifest's schema: the type and range of every field, checked once, where a manifest is read.

A manifest is JSON a user can open and edit. :func:`check_manifest` refuses one whose fields a
reader could not use (``files`` as a list, ``format_version`` as ``"2"``, ``confidence_radius_km``
of ``"far"``, -5 or NaN, an unknown ``model_config`` key, ``skipped`` set to 5 ...) with one
:class:`IndexFormatError` that names the file and the field, and says what the value is and what
it should be, so that no later comparison can print "has 1040 bytes, the manifest says 1040".

Every file name the manifest holds (``files``, ``checksums``, ``stamps``, ``calibration.file``,
``adapt.file``)
must be a plain file name: a path (``../../../../etc/passwd``, ``/etc/hostname``) would make
``index verify`` read or report files outside the index folder. A name that is a link leading
outside the folder is refused where the file is opened (:func:`outside_problem`).

Fields the schema does not know are kept and ignored (a newer delg-geo may add some).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from delg_geo.core.errors import IndexFormatError

REQUIRED = ("model_id", "model_fingerprint", "global_dim", "search_dim", "local_dim", "num_images",
            "num_local_features", "index_type")
_STRINGS = ("model_id", "model_fingerprint", "index_type", "local_features", "local_fingerprint", "created", "updated",
            "build_id", "model_path")
#: whole-number fields and their least value
_COUNTS = {"global_dim": 1, "search_dim": 1, "local_dim": 0, "num_images": 0, "num_local_features": 0}
_OBJECTS = ("model_config", "local_config", "whitening", "files", "checksums", "stamps", "versions", "search", "local",
            "calibration", "asmk", "adapt")
_LISTS = ("skipped", "sources")
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
#: files every format-2 index has (the ASMK inverted file's, when ``asmk`` is filled in)
FORMAT2_FILES = ("metadata.csv", "whitening.npz", "global.npy", "local_offsets.npy", "local_keypoints.npy",
                 "local_codes.npy", "local_codec.npz")
ASMK_FILES = ("asmk_codebook.npz", "asmk_offsets.npy", "asmk_counts.npy", "asmk_ids.npy", "asmk_sigs.npy")
_DIGEST = re.compile(r"^[a-z0-9_]+:[0-9a-f]+$")


def describe(v) -> str:
    """A value as a message names it, with its JSON type: ``the string "2"``, ``null``, ``a list``."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        s = v if len(v) <= 60 else v[:57] + "..."
        return f'the string "{s}"'
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, list):
        return f"a list ({len(v)} item{'s' if len(v) != 1 else ''})"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def whole(v) -> bool:
    """A JSON whole number (not a boolean, not a float such as 3.0)."""
    return isinstance(v, int) and not isinstance(v, bool)


def number(v) -> bool:
    """A finite JSON number (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def name_problem(name) -> str | None:
    """Why ``name`` is not a plain file name inside an index folder, or None."""
    if not isinstance(name, str):
        return f"{describe(name)} is not a file name"
    if not name or name in (".", "..") or "\x00" in name:
        return f"{describe(name)} is not a file name"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f'"{name}" is an absolute path, outside the index folder'
    if ".." in re.split(r"[/\\]", name):
        return f'"{name}" leads outside the index folder'
    if "/" in name or "\\" in name:
        return f'"{name}" is a path; the index\'s files are plain names inside its folder'
    return None


def outside_problem(index_dir: Path, name: str) -> str | None:
    """Why file ``name`` of the index, once links are followed, is not inside the index folder."""
    p = Path(index_dir) / name
    if not p.is_symlink():
        return None
    target = p.resolve()
    if target.parent != Path(index_dir).resolve():
        return f"is a link leading outside the index folder (to {target})"
    return None


class _Problem(Exception):
    def __init__(self, field: str | None, why: str):
        self.field, self.why = field, why


def _expect(ok: bool, field: str, value, what: str) -> None:
    if not ok:
        raise _Problem(field, f"is {describe(value)}, not {what}")


def check_manifest(d, where: str | Path) -> None:
    """Refuse (:class:`IndexFormatError`) a parsed manifest ``d`` that does not follow the schema;
    ``where`` is the manifest's path, named in the message."""
    try:
        _check(d)
    except _Problem as p:
        what = "it" if p.field is None else f"field {p.field}"
        raise IndexFormatError(
            f"damaged manifest {where}: {what} {p.why}; restore the manifest from a backup, "
            "or rebuild the index") from None


def _check(d) -> None:
    if not isinstance(d, dict):
        raise _Problem(None, f"is {describe(d)}, not an object of fields")
    for k in REQUIRED:
        if k not in d:
            raise _Problem(k, "is missing")
    for k in _STRINGS:
        if k in d:
            _expect(isinstance(d[k], str), k, d[k], "a string")
    for k, least in _COUNTS.items():
        _expect(whole(d[k]) and d[k] >= least, k, d[k], f"a whole number of at least {least}")
    for k in _OBJECTS:
        if k in d:
            _expect(isinstance(d[k], dict), k, d[k], "an object")
    for k in _LISTS:
        if k in d:
            _expect(isinstance(d[k], list), k, d[k], "a list")
    fv = d.get("format_version", 1)
    _expect(whole(fv), "format_version", fv, "a whole number (1 or 2)")
    _expect(d["index_type"] in INDEX_TYPES, "index_type", d["index_type"], "one of " + ", ".join(INDEX_TYPES))
    r = d.get("confidence_radius_km", 0.1)
    _expect(number(r) and 0 < r <= 20_040, "confidence_radius_km", r, "a number of kilometres above 0 (at most 20040)")
    for i, s in enumerate(d.get("skipped", [])):
        _expect(isinstance(s, dict), f"skipped[{i}]", s, "an object (row, image, reason)")
    _check_files(d)
    _check_parts(d)
    _check_model_config(d)
    _check_local(d)


def _check_files(d) -> None:
    files = d.get("files", {})
    for name, size in files.items():
        why = name_problem(name)
        if why:
            raise _Problem("files", f"names {why}")
        _expect(whole(size) and size >= 0, f'files["{name}"]', size, "a whole number of bytes")
    for key in ("checksums", "stamps"):
        for name, digest in d.get(key, {}).items():
            why = name_problem(name)
            if why:
                raise _Problem(key, f"names {why}")
            if name not in files:
                raise _Problem(key, f'names "{name}", which field files does not list')
            _expect(isinstance(digest, str) and bool(_DIGEST.match(digest)), f'{key}["{name}"]', digest,
                    'a digest such as "xxh3_128:0123abcd..."')
            algo = digest.split(":", 1)[0]
            if algo not in (("xxh3_128s",) if key == "stamps" else ("xxh3_128", *hashlib.algorithms_available)):
                raise _Problem(f'{key}["{name}"]', f"uses the unknown algorithm {algo!r}")
    if d.get("format_version", 1) == 2:
        need = FORMAT2_FILES + (ASMK_FILES if d.get("asmk") else ()) + (("global.faiss",) if d["index_type"] != "flat" else ())
        missing = [n for n in need if n not in files]
        if missing:
            raise _Problem("files", f"lacks {', '.join(missing)}, which this index has (format 2, "
                                    f"{d['index_type']}{', with an inverted file' if d.get('asmk') else ''})")


def _check_parts(d) -> None:
    """The sub-fields a reader uses: search, local, calibration, adapt and asmk."""
    search = d.get("search", {})
    for k in ("refine", "nlist", "nprobe", "pq_m", "pq_bits", "M", "ef_search", "ef_construction", "exact_limit"):
        if k in search:
            _expect(whole(search[k]) and search[k] >= 0, f"search.{k}", search[k], "a whole number")
    local = d.get("local", {})
    if "max_features" in local:
        _expect(whole(local["max_features"]) and local["max_features"] >= 1, "local.max_features",
                local["max_features"], "a whole number of at least 1")
    cal = d.get("calibration", {})
    if cal:
        why = name_problem(cal.get("file"))
        if why:
            raise _Problem("calibration.file", why)
        if "size" in cal:
            _expect(whole(cal["size"]) and cal["size"] >= 0, "calibration.size", cal["size"], "a whole number of bytes")
        if "radius_km" in cal:
            _expect(number(cal["radius_km"]) and cal["radius_km"] > 0, "calibration.radius_km", cal["radius_km"],
                    "a number of kilometres above 0")
    adapt = d.get("adapt", {})
    if "file" in adapt:
        why = name_problem(adapt["file"])
        if why:
            raise _Problem("adapt.file", why)
    asmk = d.get("asmk", {})
    if asmk:
        for k, lo, hi in (("alpha", 0.0, 100.0), ("tau", -1.0, 1.0)):
            if k in asmk:
                _expect(number(asmk[k]) and lo <= asmk[k] < hi, f"asmk.{k}", asmk[k], f"a number in [{lo:g}, {hi:g})")


def _check_model_config(d) -> None:
    """The default model's settings: the keys and types of ``LiteDelgConfig`` (a query rebuilds
    the extractor from them)."""
    cfg = d.get("model_config", {})
    if d["model_id"] != "efficientnet-lite0" or not cfg:
        return
    import dataclasses

    from delg_geo.features.models.lite_delg import LiteDelgConfig

    fields = {f.name: f for f in dataclasses.fields(LiteDelgConfig)}
    unknown = sorted(k for k in cfg if k not in fields)
    if unknown:
        raise _Problem("model_config", f"has unknown key(s) {', '.join(map(repr, unknown))} (efficientnet-lite0 "
                                       f"knows {', '.join(fields)})")
    for k, v in cfg.items():
        default = fields[k].default
        at = f"model_config.{k}"
        if isinstance(default, tuple):
            _expect(isinstance(v, list) and len(v) > 0 and all(number(x) and x > 0 for x in v), at, v,
                    "a list of numbers above 0")
        elif isinstance(default, str):
            _expect(isinstance(v, str), at, v, "a string")
        elif isinstance(default, float):
            _expect(number(v) and v > 0, at, v, "a number above 0")
        elif isinstance(default, int):
            _expect(whole(v) and v >= 0, at, v, "a whole number")


def _check_local(d) -> None:
    """The local features' name, and the settings a query passes to their extractor."""
    import inspect

    from delg_geo.features.models.local_features import LOCAL_CHOICES, LearnedLocal

    name = d.get("local_features", "delg")
    _expect(name in LOCAL_CHOICES, "local_features", name, "one of " + ", ".join(LOCAL_CHOICES))
    cfg = d.get("local_config", {})
    if name == "delg" or not cfg:
        return
    # LearnedLocal's settings (after self and the name), by the type of their defaults
    params = list(inspect.signature(LearnedLocal.__init__).parameters.values())[2:]
    known = {q.name: "bool" if isinstance(q.default, bool) else "count" for q in params}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise _Problem("local_config", f"has unknown key(s) {', '.join(map(repr, unknown))} ({name} knows "
                                       f"{', '.join(known)})")
    for k, v in cfg.items():
        if known[k] == "bool":
            _expect(isinstance(v, bool), f"local_config.{k}", v, "true or false")
        else:
            _expect(whole(v) and v >= 1, f"local_config.{k}", v, "a whole number of at least 1")

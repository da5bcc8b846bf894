"""The state of a build in its work folder: what an interrupted run recorded (model, local
features, build id), its failures, and the complete index an ``index add`` extends."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pandas as pd

from delg_geo.core.errors import DelgGeoError, IndexFormatError
from delg_geo.index.geo_index import MANIFEST, now_iso, read_manifest, write_atomic
from delg_geo.index.integrity import check_metadata, damaged_message, file_problem
from index_builder.work import BUILDING, STAGING, _kill_point


def _local_of(extractor) -> tuple[str, str]:
    """(local-feature type, its fingerprint): ("delg", "") for a model's own local features."""
    name = getattr(extractor, "local_features", "delg")
    return name, ("" if name == "delg" else getattr(extractor, "local_fingerprint", ""))


def _state_path(index_dir: Path) -> Path:
    return index_dir / BUILDING / "state.json"


def _read_state(index_dir: Path) -> dict | None:
    try:
        d = json.loads(_state_path(index_dir).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _finished_leftovers(index_dir: Path) -> bool:
    """True when ``.building``/``.staging`` are leftovers of the build that wrote the manifest."""
    if not (index_dir / MANIFEST).exists() or (index_dir / STAGING / MANIFEST).exists():
        return False
    if not (index_dir / BUILDING).exists():
        return False
    try:
        built_by = json.loads((index_dir / MANIFEST).read_text()).get("build_id")
    except (OSError, ValueError, AttributeError):
        return False
    state = _read_state(index_dir)
    return bool(built_by) and state is not None and state.get("build_id") == built_by


def _empty_building(index_dir: Path) -> bool:
    """``.building`` exists but holds no saved work (no checkpoint, no failure list)."""
    b = index_dir / BUILDING
    if not b.exists():
        return False
    return not any((b / "parts").glob("part-*.npz")) and not (b / "failed.jsonl").exists()


def _read_failed(failed_file: Path, log) -> dict:
    """Images an interrupted run could not use, by key. Damaged lines (a kill mid-write) are
    ignored: those images are simply tried again."""
    failed: dict = {}
    if not failed_file.exists():
        return failed
    bad = 0
    for line in failed_file.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            failed[str(d["key"])] = dict(key=str(d["key"]), row=d.get("row"), image=str(d.get("image", "")),
                                         reason=str(d.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        log(f"{failed_file}: {bad} damaged line(s) ignored; those images are tried again")
    return failed


def _default_local(index_dir: Path, model: str | None, continuing: bool, log=print) -> str:
    """``--local`` when not given: what the index (or the interrupted build) being continued holds,
    else the default for ``model`` (:func:`delg_geo.features.models.local_features.default_local`), or
    ``delg`` with a note when that default's weights are not installed (a build that asked for
    nothing keeps working; ``--local aliked-n16`` itself refuses with how to get them)."""
    from delg_geo.features.models.local_features import default_local
    from delg_geo.features.models.local_weights import find_weights

    if continuing:
        if (index_dir / MANIFEST).exists():
            try:
                return read_manifest(index_dir).local_features or "delg"
            except DelgGeoError:
                pass  # a damaged manifest: the checks below name it
        state = _read_state(index_dir)
        if state is not None and state.get("local_features"):
            return str(state["local_features"])
    local = default_local(model)
    if local != "delg" and find_weights(local) is None:
        log(f"the {local} weights (the default local features) are not installed: building with the model's own "
            f"(--local delg); `delg-geo model fetch-weights`, then rebuild, for {local}")
        return "delg"
    return local


def _existing_index(index_dir: Path) -> dict | None:
    """The manifest and metadata of a complete index (for ``index add``), every file checked first."""
    if not (index_dir / MANIFEST).exists():
        return None
    m = read_manifest(index_dir)
    for name, size in m.files.items():  # its records are all copied: check every byte first
        why = file_problem(index_dir, name, size, m.checksums.get(name), full=True)
        if why:
            raise IndexFormatError(damaged_message(index_dir, name, why))
    md = pd.read_csv(index_dir / "metadata.csv", keep_default_na=False, na_values=[""])
    check_metadata(md, index_dir / "metadata.csv")
    return dict(metadata=md, manifest=m)


def open_state(index_dir: Path, extractor, add: bool, log) -> dict:
    """The interrupted build's state (checked against this run's model and local features), or a
    new one written to ``.building/state.json``."""
    state_file = _state_path(index_dir)
    state = None
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
            if not isinstance(state, dict):
                raise ValueError(f"a JSON {type(state).__name__}, not an object")
        except (ValueError, OSError) as e:
            log(f"{state_file} is damaged ({e}); recreating it (checkpoints are checked one by one)")
            state = None
    if state is not None:
        if state.get("local_fingerprint", "") != _local_of(extractor)[1]:
            raise IndexFormatError(
                f"{index_dir}: the interrupted build used --local {state.get('local_features', 'delg')}; "
                "resume it with that choice or use --overwrite"
            )
        if state.get("model_fingerprint") != extractor.fingerprint:
            raise IndexFormatError(
                f"{index_dir}: the interrupted build used model {state.get('model_id')!r} "
                f"({str(state.get('model_fingerprint'))[:12]}); resume it with that model or use --overwrite"
            )
    if state is None or not state.get("build_id"):
        state = dict(state or {}, **{
            "model_id": extractor.model_id,
            "model_fingerprint": extractor.fingerprint,
            "local_features": _local_of(extractor)[0],
            "local_fingerprint": _local_of(extractor)[1],
            "started": (state or {}).get("started") or now_iso(),
            "mode": "add" if add else "build",
            "build_id": secrets.token_hex(8),  # the finished manifest carries it (see _finished_leftovers)
        })
        state_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(state_file, json.dumps(state, indent=2))
    _kill_point("state")
    return state


def check_existing(index_dir: Path, existing: dict, extractor) -> None:
    """Refuse to add features of another model or other local features to ``existing``."""
    m = existing["manifest"]
    if getattr(m, "adapt", None):
        raise IndexFormatError(
            f"{index_dir} is adapted to its collection (`index adapt`, adapt.npz); adding photos to an adapted index "
            "is not supported: build an index of the whole collection, then adapt it again")
    if m.model_fingerprint != extractor.fingerprint or m.model_id != extractor.model_id:
        raise IndexFormatError(
            f"{index_dir} was built with model {m.model_id!r} ({m.model_fingerprint[:12]}); "
            f"cannot add features of {extractor.model_id!r} ({extractor.fingerprint[:12]})"
        )
    if (m.local_features, m.local_fingerprint) != _local_of(extractor):
        raise IndexFormatError(
            f"{index_dir} holds {m.local_features!r} local features; cannot add {_local_of(extractor)[0]!r} "
            f"ones (add with --local {m.local_features})"
        )

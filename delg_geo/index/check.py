"""``delg-geo index verify``: every file of an index against its manifest, then its contents opened
as a query would open them (metadata, the global index, each image's local features, the inverted
file, and the cross-checks of ``crosscheck.py``).

An index without recorded checksums (built before delg-geo recorded them) fails unless the caller
allows it (``allow_unchecked``): a same-size file swapped in from another index would otherwise
pass. ``rehash`` records the missing checksums (and stamps) once every other check has passed.
"""

from __future__ import annotations

from pathlib import Path

from delg_geo.core.errors import DelgGeoError, IndexFormatError
from delg_geo.index.geo_index import MANIFEST, GeoIndex, load_manifest
from delg_geo.index.integrity import damaged_message, file_problem


def _unchecked_problem(index_dir: Path, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"{len(names)} file(s) have no recorded checksum ({shown}; an index built before delg-geo recorded "
            "them), so a same-size file swapped in from another index would pass; if you trust these files, record "
            f"their checksums with `delg-geo index verify --index {index_dir} --rehash`, or accept them unchecked "
            "with --allow-unchecked")


def verify_index(index_dir: str | Path, progress=None, allow_unchecked: bool = False, rehash: bool = False) -> dict:
    """Check every file of an index against its manifest (size and checksum), then open it and
    check the metadata, the global index, every image's local features and the cross-checks.

    Files without a recorded checksum fail the index unless ``allow_unchecked`` or ``rehash``;
    ``rehash`` then records their checksums and stamps in the manifest when nothing else failed.
    Returns ``{"index", "ok", "damaged", "files": [{"name", "ok", "problem", "checksum", "unchecked"}],
    "problems": [str], "checked", "unchecked": [names]}`` (``"rehashed": [names]`` after a rehash).
    """
    index_dir = Path(index_dir)
    if not (index_dir / MANIFEST).exists():
        load_manifest(index_dir)  # raises, saying what is there instead
    if rehash:
        from delg_geo.index.lock import writer_lock

        try:
            with writer_lock(index_dir, "delg-geo index verify --rehash"):
                return _verify(index_dir, progress, True, True)
        except PermissionError as e:
            raise DelgGeoError(f"cannot record checksums in {index_dir}: {e.strerror} ({e.filename})") from None
        except OSError as e:
            raise DelgGeoError(f"cannot record checksums in {index_dir}: {e}") from None
    return _verify(index_dir, progress, allow_unchecked, False)


def _verify(index_dir: Path, progress, allow_unchecked: bool, rehash: bool) -> dict:
    try:
        m = load_manifest(index_dir)
    except IndexFormatError as e:
        return dict(index=str(index_dir), ok=False, damaged=True, files=[dict(name=MANIFEST, ok=False, problem=str(e), checksum="",
                                                               unchecked=False)],
                    problems=[str(e)], checked=[], unchecked=[])
    files, problems = [], []
    for name, size in m.files.items():
        why = file_problem(index_dir, name, size, m.checksums.get(name), full=True, stamp=m.stamps.get(name),
                           build_id=m.build_id)
        files.append(dict(name=name, ok=why is None, problem=why or "", checksum=m.checksums.get(name, ""),
                          unchecked=name not in m.checksums))
        if why:
            problems.append(f"{name}: {why}")
        if progress:
            progress(name)
    unchecked = [f["name"] for f in files if f["unchecked"]]
    checked = ["sizes"] + (["checksums"] if m.checksums else [])
    if not problems:  # the contents, opened as a query would open them
        problems += _contents(index_dir, checked)
    out = dict(index=str(index_dir), ok=not problems, damaged=bool(problems), files=files, problems=problems,
               checked=checked, unchecked=unchecked)
    if unchecked and not problems and rehash:
        out["rehashed"] = _record_checksums(index_dir, unchecked)
        out["note"] = f"recorded the checksums of {len(unchecked)} file(s) in {MANIFEST}"
    elif unchecked and not allow_unchecked:
        out["problems"].insert(0, _unchecked_problem(index_dir, unchecked))
        out["ok"] = False
    elif unchecked:
        out["note"] = (f"{len(unchecked)} file(s) have no recorded checksum: sizes, contents and cross-checks "
                       "checked only (--allow-unchecked)")
    return out


def _contents(index_dir: Path, checked: list) -> list[str]:
    """Problems found by opening the index and reading every image's local features and the
    inverted file; appends what was checked to ``checked``."""
    problems = []
    try:
        idx = GeoIndex(index_dir, device="cpu", check_files=False)
        checked += ["metadata", "global index", "cross-checks"]
        bad = idx.damaged_images()
        checked.append("local features")
        for i, why in bad[:20]:
            problems.append(f"image {i} ({idx.table.image(i)}): local features: {why}")
        if len(bad) > 20:
            problems.append(f"... {len(bad) - 20} more images with damaged local features")
        if idx.asmk is not None:
            checked.append("inverted file")
            bad_file = idx.asmk.problem()
            if bad_file:
                problems.append(damaged_message(index_dir, *bad_file))
        if idx.manifest.adapt:  # `index adapt`: its weights are the ones the index was adapted with
            from delg_geo.index.adapted_file import adapted_problem

            checked.append("adapted weights")
            bad_weights = adapted_problem(index_dir, idx.manifest)
            if bad_weights:
                problems.append(bad_weights)
    except IndexFormatError as e:
        problems.append(str(e))
    return problems


def _record_checksums(index_dir: Path, names: list[str]) -> list[str]:
    """Add the checksums and stamps of ``names`` to the manifest (its other fields kept as they are)."""
    import json

    from delg_geo.core.jsonio import dumps
    from delg_geo.index.geo_index import write_atomic
    from delg_geo.index.integrity import file_checksum, file_stamp
    from delg_geo.index.lock import swapping

    mpath = index_dir / MANIFEST
    d = json.loads(mpath.read_text())
    d.setdefault("checksums", {})
    d.setdefault("stamps", {})
    for name in names:
        d["checksums"][name] = file_checksum(index_dir / name)
    for name in d["files"]:
        d["stamps"].setdefault(name, file_stamp(index_dir / name, d.get("build_id", "")))
    with swapping(index_dir):
        write_atomic(mpath, dumps(d, indent=2))
    return list(names)

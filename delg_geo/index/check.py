"""``delg-geo index verify``: every file of an index against its manifest, then its contents opened
as a query would open them (metadata, the global index, each image's local features, the inverted
file)."""

from __future__ import annotations

from pathlib import Path

from delg_geo.core.errors import IndexFormatError
from delg_geo.index.geo_index import MANIFEST, GeoIndex, Manifest
from delg_geo.index.integrity import damaged_message, file_problem


def verify_index(index_dir: str | Path, progress=None) -> dict:
    """Check every file of an index against its manifest (size and checksum), then open it and
    check the metadata, the global index and every image's local features.

    Returns ``{"index", "ok", "files": [{"name", "ok", "problem"}], "problems": [str], "checked"}``.
    """
    import json

    index_dir = Path(index_dir)
    mpath = index_dir / MANIFEST
    if not mpath.exists():
        raise IndexFormatError(f"{index_dir}: no {MANIFEST}; not a complete delg-geo index")
    try:
        m = Manifest.from_dict(json.loads(mpath.read_text()))
    except (ValueError, TypeError) as e:
        return dict(index=str(index_dir), ok=False, files=[dict(name=MANIFEST, ok=False, problem=f"corrupt ({e})")],
                    problems=[f"{MANIFEST}: corrupt ({e})"], checked=[])
    files, problems = [], []
    for name, size in m.files.items():
        why = file_problem(index_dir, name, size, m.checksums.get(name), full=True)
        files.append(dict(name=name, ok=why is None, problem=why or "", checksum=m.checksums.get(name, "")))
        if why:
            problems.append(f"{name}: {why}")
        if progress:
            progress(name)
    checked = ["sizes"] + (["checksums"] if m.checksums else [])
    if not m.checksums:
        problems_note = "no checksums recorded (an index built before delg-geo recorded them): sizes and contents checked only"
    else:
        problems_note = ""
    if not problems:  # the contents, opened as a query would open them
        try:
            idx = GeoIndex(index_dir, device="cpu", check_files=False)
            checked += ["metadata", "global index"]
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
        except IndexFormatError as e:
            problems.append(str(e))
    out = dict(index=str(index_dir), ok=not problems, files=files, problems=problems, checked=checked)
    if problems_note:
        out["note"] = problems_note
    return out

"""The last stage of a build, single-process or Ray: checkpoint parts become the index
(:func:`finalize`), then the confidence is calibrated on the finished index (:func:`calibrate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from delg_geo.core.errors import DelgGeoError
from delg_geo.index.geo_index import now_iso
from index_builder.assemble import ModelInfo, Part, assemble_index, legacy_loaders
from index_builder.parts import _select

#: Columns the index writes itself; a collection's own columns of these names are kept as ``user_NAME``.
OWN_COLUMNS = ("id", "image", "path", "lat", "lon", "width", "height")


def renamed_columns(records) -> dict[str, str]:
    """The collection's extra columns that clash with the index's own, and the names they are kept under."""
    names = {k for r in records for k in r.extra}
    out = {}
    for k in sorted(names & set(OWN_COLUMNS)):
        new = f"user_{k}"
        while new in names or new in OWN_COLUMNS:
            new = "user_" + new
        out[k] = new
    return out


def calibrate(index_dir: Path, n: int, opts, log) -> dict | None:
    """The optional last stage: fit the confidence on the finished index's own photos. The index
    is whole without it, so a failure is reported, not raised."""
    from delg_geo.retrieval.calibrate import MIN_IMAGES, calibrate_index

    if opts.calibrate is False or (opts.calibrate is None and n < MIN_IMAGES):
        if opts.calibrate is None:
            log(f"not calibrated: {n} images, fewer than the {MIN_IMAGES} needed "
                "(`delg-geo index calibrate` fits it anyway)")
        return None
    try:
        cal = calibrate_index(index_dir, sample=opts.calibrate_sample, progress=opts.progress, log=log)
    except DelgGeoError as e:
        log(f"not calibrated: {e}")
        return None
    return dict(radius_km=cal.radius_km, rule=cal.rule.to_dict(), **cal.stats)


def part_loader(path: Path, row_of, keep_key=None):
    """A loader of one checkpoint (or Ray shard) file as a ``Part``. ``row_of(key, (width, height))``
    gives an image's metadata row; images whose key fails ``keep_key`` are left out."""

    def load() -> Part:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in ("keys", "global_raw", "counts", "sizes", "keypoints", "descriptors", "scores")}
        if keep_key is not None:
            keep = np.array([keep_key(str(k)) for k in part["keys"]], bool)
            if not keep.all():
                part = _select(part, keep)
        rows = [row_of(str(k), (int(s[0]), int(s[1]))) for k, s in zip(part["keys"], part["sizes"])]
        return Part(metadata=pd.DataFrame(rows), counts=part["counts"], keypoints=part["keypoints"],
                    global_raw=part["global_raw"], descriptors=part["descriptors"], scores=part["scores"])

    return load


def metadata_row(rec, key: str, size, renamed: dict[str, str] | None = None) -> dict:
    """The metadata row of an extracted image: the index's own columns, then the collection's extras
    (those named like the index's own under their ``renamed`` names, never over the index's own)."""
    row = dict(image=rec.image, path=str(key), lat=rec.lat, lon=rec.lon, width=int(size[0]), height=int(size[1]))
    renamed = renamed if renamed is not None else renamed_columns([rec])
    for k, v in rec.extra.items():
        k = renamed.get(k, k)
        if k not in row and k != "id":
            row[k] = v
    return row


def finalize(index_dir, images_dir, extractor, parts, by_key, existing, skipped, opts, state, fmt, metadata, from_exif,
              allow_outside=False, log=print):
    """The final step of a build, single-process or Ray: the checkpoint parts (``parts._write_part``'s
    files, in index order) become the index through ``assemble_index``, on top of ``existing``
    (``index add``) when given. A format-1 index being added to is re-encoded with the new parts."""
    dropped = sum(int(sum(str(k) not in by_key for k in p["keys"])) for p in parts)
    if dropped:  # checkpointed, but no longer in the metadata (it was edited): left out
        log(f"{dropped} checkpointed image(s) are no longer in the metadata; left out")
    renamed = renamed_columns(by_key.values())
    loaders = [part_loader(p["path"], lambda k, size: metadata_row(by_key[k], k, size, renamed), lambda k: k in by_key)
               for p in parts]
    old = existing["manifest"] if existing is not None else None
    old_skipped = old.skipped if old else []
    seen = {(str(d.get("image")), str(d.get("reason"))) for d in old_skipped}
    all_skipped = old_skipped + [d for d in skipped if (str(d["image"]), str(d["reason"])) not in seen]
    source = dict(
        images_dir=str(Path(images_dir).resolve()),
        metadata=[str(m) for m in metadata] if isinstance(metadata, (tuple, list)) else (str(metadata) if metadata else None),
        from_exif=bool(from_exif),
        format=fmt,
        allow_outside=bool(allow_outside),
        added=sum(int(sum(str(k) in by_key for k in p["keys"])) for p in parts),
        at=now_iso(),
    )
    base = None
    if old is not None and old.format_version >= 2:
        base = index_dir
    elif old is not None:  # format 1: its raw features are encoded with the new ones
        loaders = legacy_loaders(index_dir) + loaders
        source["converted_from_format"] = 1
    assemble_index(
        index_dir, loaders, ModelInfo.of(extractor), options=opts.compact_options(), base=base, skipped=all_skipped,
        sources=(old.sources if old else []) + [source], created=old.created if old else state.get("started", now_iso()),
        build_id=str(state.get("build_id", "")), model_path=_model_path(extractor, old), log=log, progress=opts.progress,
        expected_images=source["added"] + (old.num_images if old else 0),  # sizes the inverted file's codebook
    )


def _model_path(extractor, old) -> str:
    """The SavedModel folder of a ``--model PATH`` model (not for the default), kept on ``add``."""
    from delg_geo.features.models import DEFAULT_MODEL

    p = getattr(extractor, "path", None)
    if p and extractor.model_id != DEFAULT_MODEL:
        return str(Path(p).resolve())
    return old.model_path if old is not None else ""

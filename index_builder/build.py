"""Build, resume and extend a delg-geo index from a geotagged image collection.

Extraction writes finished work to ``INDEX_DIR/.building/parts/part-NNNNN.npz`` (each part
atomically), so an interrupted build (Ctrl-C, kill, power loss) resumes with ``--resume``
without re-extracting what is done. The final files are written to ``INDEX_DIR/.staging`` and
moved into place, and ``manifest.json`` is written last: without it an index never looks whole.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from delg_geo.core.errors import DelgGeoError, IndexFormatError
from delg_geo.features.extract import iter_extract
from delg_geo.index.integrity import check_metadata, damaged_message, file_problem
from delg_geo.index.geo_index import MANIFEST, now_iso, read_manifest, write_atomic
from index_builder.parts import _load_parts, _select, _write_part  # noqa: F401 (_write_part: public here too)
from index_builder.assemble import (
    BUILDING,
    STAGING,
    CompactOptions,
    ModelInfo,
    Part,
    _kill_point,
    assemble_index,
    legacy_loaders,
    swap_staging,
)


@dataclass
class BuildOptions:
    index_type: str = "auto"  # auto | flat | ivfpq | hnsw
    batch_size: int = 4
    part_size: int = 64  # images per checkpoint file
    workers: int = 2  # decode threads
    progress: bool = True
    compact: CompactOptions = field(default_factory=CompactOptions)  # how the index is compressed

    def compact_options(self) -> CompactOptions:
        from dataclasses import replace

        return replace(self.compact, index_type=self.index_type)
    # confidence = probability of being within this radius; None: 0.1 km, or what the index had
    confidence_radius_km: float | None = None
    # fit the confidence on the collection once the index is written (delg_geo.retrieval.calibrate);
    # None: when the index holds at least calibrate.MIN_IMAGES photos
    calibrate: bool | None = None
    calibrate_sample: int = 1000


@dataclass
class BuildReport:
    index_dir: str
    num_images: int  # in the finished index
    added: int  # newly extracted in this run
    resumed: int  # taken from an interrupted run's checkpoints
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    extract_seconds: float = 0.0
    ray: dict | None = None  # how Ray ran the extraction (index_builder/ray_build.py), when it did
    calibration: dict | None = None  # the fitted calibration's summary, when one was fitted

    @property
    def images_per_s(self) -> float:
        return self.added / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_skipped"] = len(self.skipped)
        d["images_per_s"] = round(self.images_per_s, 3)
        return d


def _where(row, image) -> str:
    """How a log line names a skipped input: its metadata row when it has one, and its file."""
    return f"row {row}: {image}" if row is not None else str(image)


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


def build_index(
    images_dir: str | Path,
    index_dir: str | Path,
    metadata: str | Path | None = None,
    *,
    from_exif: bool = False,
    fmt: str = "auto",
    model: str | None = None,
    local: str | None = None,
    extractor=None,
    resume: bool = False,
    add: bool = False,
    overwrite: bool = False,
    allow_outside: bool = False,
    options: BuildOptions | None = None,
    ray=None,
    log=print,
) -> BuildReport:
    """Build (or ``resume``, or ``add`` to) the index at ``index_dir``. See the module docstring.

    With ``ray`` (an :class:`index_builder.ray_build.RayOptions`), Ray workers extract the
    features and write the same checkpoint parts; everything before and after is this function's.
    """
    from index_builder.sources import read_metadata

    opts = options or BuildOptions()
    t_start = time.perf_counter()
    images_dir = Path(images_dir)
    index_dir = Path(index_dir)
    _kill_point("start")
    if _finished_leftovers(index_dir):
        # killed after the manifest was in place, before the checkpoints were removed: the index
        # is whole, the leftovers are only in the way
        shutil.rmtree(index_dir / STAGING, ignore_errors=True)
        shutil.rmtree(index_dir / BUILDING, ignore_errors=True)
        log(f"{index_dir}: the previous build had finished; removed its leftover checkpoints")
    elif _empty_building(index_dir) and not (index_dir / STAGING).exists():
        # a run that failed or was killed before saving any work (a bad metadata file, say)
        shutil.rmtree(index_dir / BUILDING, ignore_errors=True)
    has_manifest = (index_dir / MANIFEST).exists()
    has_building = (index_dir / BUILDING).exists() or (index_dir / STAGING).exists()

    if overwrite and index_dir.exists() and not add:
        if has_manifest or has_building or not any(index_dir.iterdir()):
            shutil.rmtree(index_dir)
        else:
            raise DelgGeoError(f"{index_dir} exists and is not a delg-geo index; refusing to delete it")
        has_manifest = has_building = False
    if add and not has_manifest and not has_building:
        raise IndexFormatError(f"{index_dir}: no index to add to (build one with `delg-geo index build`)")
    if has_manifest and not add and not has_building:
        if resume:  # nothing left to resume: the index is complete
            m = read_manifest(index_dir)
            log(f"{index_dir}: the index is complete ({m.num_images} images); nothing to resume")
            return BuildReport(str(index_dir), m.num_images, 0, 0, m.skipped, time.perf_counter() - t_start)
        raise DelgGeoError(
            f"{index_dir} already holds an index; use `delg-geo index add` to extend it, "
            "or --overwrite to rebuild it"
        )
    if has_building and not (resume or add):
        raise DelgGeoError(
            f"{index_dir} holds an interrupted build; continue it with --resume, or start over with --overwrite"
        )
    if (index_dir / STAGING / MANIFEST).exists():
        # the previous run finished computing and died while moving files into place
        swap_staging(index_dir)
        m = read_manifest(index_dir)
        log(f"finished moving the staged index into place at {index_dir} ({m.num_images} images)")
        return BuildReport(str(index_dir), m.num_images, 0, m.num_images, m.skipped, time.perf_counter() - t_start)

    # the metadata is read before anything is written: a bad metadata file leaves nothing behind
    records, skipped_rows = read_metadata(
        images_dir, metadata=metadata, from_exif=from_exif, fmt=fmt, allow_outside=allow_outside
    )

    if extractor is None:
        from delg_geo.features.models import get_extractor

        extractor = get_extractor(model, local=local if local is not None else _default_local(index_dir, model, add or resume, log))
    existing = _existing_index(index_dir) if has_manifest else None
    if existing is not None:
        m = read_manifest(index_dir)
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

    index_dir.mkdir(parents=True, exist_ok=True)
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
    skipped = [dict(row=s.row, image=s.image, reason=s.reason) for s in skipped_rows]
    for s in skipped_rows:
        log(f"skipped {_where(s.row, s.image)}: {s.reason}")

    existing_keys = set(existing["metadata"]["path"]) if existing is not None else set()
    new_records = []
    for r in records:
        key = str(r.path.resolve())
        if key in existing_keys:
            skipped.append(dict(row=r.row, image=r.image, reason="already in the index"))
            continue
        new_records.append((key, r))
    parts = _load_parts(index_dir, extractor, log, opts.compact.max_local)
    done = {str(k) for p in parts for k in p["keys"]}
    failed_file = index_dir / BUILDING / "failed.jsonl"
    failed = _read_failed(failed_file, log)
    todo = [(k, r) for k, r in new_records if k not in done and k not in failed]
    resumed = sum(1 for k, _ in new_records if k in done)
    if resumed:
        log(f"resuming: {resumed} images already extracted, {len(todo)} to go")

    by_key = {k: r for k, r in new_records}
    t_extract = time.perf_counter()
    next_part = max([int(p.name[5:10]) for p in (index_dir / BUILDING / "parts").glob("part-*.npz")], default=-1) + 1
    buffer: list[dict] = []
    added = 0
    ray_info = None

    def record_failure(key: str, reason: str) -> None:
        rec = by_key[key]
        log(f"skipped {_where(rec.row, rec.image)}: {reason}")
        entry = dict(key=key, row=rec.row, image=rec.image, reason=reason)
        with open(failed_file, "a") as f:
            f.write("\n" + json.dumps(entry) + "\n")  # a line cut by a kill stays alone
        failed[key] = entry

    if ray is not None:  # Ray workers write the parts; the loop below then has nothing to do
        from index_builder.ray_build import extract_on_ray

        added, ray_info = extract_on_ray(
            index_dir, [k for k, _ in new_records], todo, done, next_part, model, extractor, opts, ray,
            record_failure, log,
        )
        todo = []
    try:
        for res in iter_extract(
            [str(r.path) for _, r in todo],
            extractor,
            batch_size=opts.batch_size,
            workers=opts.workers,
            progress="index" if opts.progress and todo else False,
        ):
            key, rec = todo[res.index]
            if not res.ok:
                record_failure(key, res.error)
                _kill_point("failed")
                continue
            buffer.append(dict(key=key, features=res.features))
            if len(buffer) >= opts.part_size:
                _write_part(index_dir, next_part, buffer, extractor, opts.compact.max_local)
                next_part += 1
                added += len(buffer)
                buffer = []
        if buffer:
            _write_part(index_dir, next_part, buffer, extractor, opts.compact.max_local)
            added += len(buffer)
            buffer = []
    except KeyboardInterrupt:
        raise DelgGeoError(
            f"interrupted: {added + resumed} images are checkpointed in {index_dir / BUILDING}; "
            "continue with the same command and --resume"
        ) from None
    extract_seconds = time.perf_counter() - t_extract
    skipped.extend(dict(row=d["row"], image=d["image"], reason=d["reason"]) for k, d in failed.items() if k in by_key)
    _kill_point("extracted")

    parts = _load_parts(index_dir, extractor, log, opts.compact.max_local)
    if existing is not None and not parts:
        # nothing new to add (all already there, or none could be used): the index stays as it is
        shutil.rmtree(index_dir / BUILDING, ignore_errors=True)
        log(f"{index_dir}: no new image to add; the index is unchanged")
        return BuildReport(str(index_dir), len(existing["metadata"]), 0, resumed, skipped,
                           time.perf_counter() - t_start, extract_seconds, ray_info)
    # assembled in the metadata's order, whichever order the parts were written in (Ray, resumes)
    position = {k: i for i, (k, _) in enumerate(new_records)}
    parts.sort(key=lambda p: position.get(str(p["keys"][0]), -1))
    old_radius = read_manifest(index_dir).confidence_radius_km if existing is not None else None
    _finalize(index_dir, images_dir, extractor, parts, by_key, existing, skipped, opts, state, fmt, metadata, from_exif,
              allow_outside, log=log)
    radius = opts.confidence_radius_km or old_radius
    if radius:  # the radius the confidence is about: as asked, else as the index had it
        from delg_geo.retrieval.calibrate import set_confidence_radius

        set_confidence_radius(index_dir, radius)
    m = read_manifest(index_dir)
    calibration = _calibrate(index_dir, m.num_images, opts, log)
    return BuildReport(
        str(index_dir), m.num_images, added, resumed, skipped, time.perf_counter() - t_start, extract_seconds, ray_info,
        calibration,
    )


def _calibrate(index_dir: Path, n: int, opts: BuildOptions, log) -> dict | None:
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


def metadata_row(rec, key: str, size) -> dict:
    """The metadata row of an extracted image: the index's own columns, then the collection's extras."""
    row = dict(image=rec.image, path=str(key), lat=rec.lat, lon=rec.lon, width=int(size[0]), height=int(size[1]))
    # the collection's extra columns are kept, but never over the index's own
    row.update({k: v for k, v in rec.extra.items() if k not in row and k != "id"})
    return row


def _finalize(index_dir, images_dir, extractor, parts, by_key, existing, skipped, opts, state, fmt, metadata, from_exif,
              allow_outside=False, log=print):
    """The final step of a build, single-process or Ray: the checkpoint parts (``_write_part``'s
    files, in index order) become the index through ``assemble_index``, on top of ``existing``
    (``index add``) when given. A format-1 index being added to is re-encoded with the new parts."""
    dropped = sum(int(sum(str(k) not in by_key for k in p["keys"])) for p in parts)
    if dropped:  # checkpointed, but no longer in the metadata (it was edited): left out
        log(f"{dropped} checkpointed image(s) are no longer in the metadata; left out")
    loaders = [part_loader(p["path"], lambda k, size: metadata_row(by_key[k], k, size), lambda k: k in by_key)
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

"""Build, resume and extend a delg-geo index from a geotagged image collection.

Every input is read and checked first (options, ``--index``, the metadata); nothing is deleted or
written before. Then one writer takes the index folder's lock (:mod:`delg_geo.index.lock`).

Extraction writes finished work to ``INDEX_DIR/.building/parts/part-NNNNN.npz`` (each part
atomically), so an interrupted build (Ctrl-C, kill, power loss) resumes with ``--resume``
without re-extracting what is done. The final files are written to ``INDEX_DIR/.staging`` and
moved into place, and ``manifest.json`` is written last: without it an index never looks whole.
``--overwrite`` of a complete index builds the new one whole in ``INDEX_DIR/.rebuild`` and swaps
it in only when it is complete: until then the old index answers queries, and survives any failure.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from delg_geo.core.errors import DelgGeoError, IndexFormatError
from delg_geo.features.extract import iter_extract
from delg_geo.index.geo_index import MANIFEST, read_manifest
from delg_geo.index.lock import writer_lock
from index_builder.assemble import CompactOptions, swap_staging
from index_builder.finish import calibrate as _calibrate, finalize as _finalize
from index_builder.guard import check_index_apart, check_index_target, clear_work, is_delg_geo_index, storage_errors
from index_builder.parts import _load_parts, _write_part  # noqa: F401 (_write_part: public here too)
from index_builder.state import (  # noqa: F401 (_default_local: public here too)
    _default_local,
    _empty_building,
    _existing_index,
    _finished_leftovers,
    _read_failed,
    check_existing,
    open_state,
)
from index_builder.swap import swap_in
from index_builder.work import BUILDING, REBUILD, STAGING, _kill_point

#: The global index types ``--index-type`` accepts.
INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")


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

    def check(self) -> None:
        """Refuse a bad option before any work is done."""
        if self.index_type not in INDEX_TYPES:
            raise DelgGeoError(f"--index-type {self.index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
        for name in ("batch_size", "part_size", "workers", "calibrate_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DelgGeoError(f"--{name.replace('_', '-')} {v!r}: give a whole number of at least 1")
        r = self.confidence_radius_km
        if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise DelgGeoError(f"--confidence-radius-km {r!r}: give a positive number of kilometres")


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
    notes: list = field(default_factory=list)  # what the build changed or kept that the user should know

    @property
    def images_per_s(self) -> float:
        return self.added / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_skipped"] = len(self.skipped)
        d["images_per_s"] = round(self.images_per_s, 3)
        return d


@dataclass
class _Job:
    """One build's inputs, read and checked before anything is written."""

    images_dir: Path
    metadata: object
    records: list
    skipped_rows: list
    from_exif: bool
    fmt: str
    model: str | None
    local: str | None
    extractor: object
    add: bool
    allow_outside: bool
    opts: BuildOptions
    ray: object
    log: object
    t_start: float


def _where(row, image) -> str:
    """How a log line names a skipped input: its metadata row when it has one, and its file."""
    return f"row {row}: {image}" if row is not None else str(image)


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
    images_dir, index_dir = Path(images_dir), Path(index_dir)
    opts.check()
    check_index_target(images_dir, index_dir, overwrite=overwrite and not add)
    if add and not (index_dir / MANIFEST).exists() and not (index_dir / BUILDING).exists() \
            and not (index_dir / STAGING).exists():
        raise IndexFormatError(f"{index_dir}: no index to add to (build one with `delg-geo index build`)")
    _kill_point("start")
    # every input is read before anything is written or deleted: a bad metadata file changes nothing
    records, skipped_rows = read_metadata(
        images_dir, metadata=metadata, from_exif=from_exif, fmt=fmt, allow_outside=allow_outside
    )
    check_index_apart(images_dir, index_dir, records, walked=metadata is None)
    job = _Job(images_dir, metadata, records, skipped_rows, from_exif, fmt, model, local, extractor, add,
               allow_outside, opts, ray, log, t_start)
    with storage_errors(index_dir), writer_lock(index_dir):
        if (index_dir / REBUILD / MANIFEST).exists() and not (index_dir / MANIFEST).exists():
            swap_in(index_dir, index_dir / REBUILD)  # killed while swapping a rebuild in: finish it
            log(f"finished moving the rebuilt index into place at {index_dir}")
        if overwrite and not add and is_delg_geo_index(index_dir):
            return _rebuild(index_dir, job)
        if overwrite and not add:
            clear_work(index_dir)  # an interrupted build's work folders, never anything else
        elif (index_dir / REBUILD).exists():
            raise DelgGeoError(f"{index_dir} holds an interrupted `--overwrite` rebuild; continue it with --overwrite "
                               "(the current index answers queries until the new one is complete)")
        return _build_into(index_dir, job, resume=resume)


def _rebuild(index_dir: Path, job: _Job) -> BuildReport:
    """``--overwrite`` of a complete index: build the new one whole in ``.rebuild`` (resuming an
    interrupted rebuild with the same model), then swap it in."""
    target = index_dir / REBUILD
    try:
        rep = _build_into(target, job, resume=True)
    except IndexFormatError as e:  # a rebuild left by another model or local features: start it over
        job.log(f"starting the rebuild over ({e})")
        shutil.rmtree(target, ignore_errors=True)
        rep = _build_into(target, job, resume=False)
    _kill_point("rebuilt")
    swap_in(index_dir, target)
    clear_work(index_dir)
    rep.index_dir = str(index_dir)
    rep.notes.append(f"replaced the previous index in {index_dir}")
    job.log(f"replaced the previous index in {index_dir}")
    return rep


def _early(index_dir: Path, job: _Job, resume: bool) -> BuildReport | None:
    """Leftovers, the mode checks, and the cases with nothing to extract."""
    log, add = job.log, job.add
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
    if add and not has_manifest and not has_building:
        raise IndexFormatError(f"{index_dir}: no index to add to (build one with `delg-geo index build`)")
    if has_manifest and not add and not has_building:
        if resume:  # nothing left to resume: the index is complete
            m = read_manifest(index_dir)
            log(f"{index_dir}: the index is complete ({m.num_images} images); nothing to resume")
            return BuildReport(str(index_dir), m.num_images, 0, 0, m.skipped, time.perf_counter() - job.t_start)
        raise DelgGeoError(
            f"{index_dir} already holds an index; use `delg-geo index add` to extend it, "
            "or --overwrite to rebuild it (the current index stays until the new one is complete)"
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
        return BuildReport(str(index_dir), m.num_images, 0, m.num_images, m.skipped, time.perf_counter() - job.t_start)
    return None


def _build_into(index_dir: Path, job: _Job, resume: bool) -> BuildReport:
    """Extract what is not done yet into checkpoints, then assemble and calibrate the index."""
    early = _early(index_dir, job, resume)
    if early is not None:
        return early
    log, opts = job.log, job.opts
    has_manifest = (index_dir / MANIFEST).exists()
    extractor = job.extractor
    if extractor is None:
        from delg_geo.features.models import get_extractor

        local = job.local if job.local is not None else _default_local(index_dir, job.model, job.add or resume, log)
        if opts.progress:  # not with --json: loading takes seconds, longer the first time
            log(f"loading the model {job.model or 'efficientnet-lite0'} (a few seconds, longer the first time) ...")
        extractor = get_extractor(job.model, local=local)
    existing = _existing_index(index_dir) if has_manifest else None
    if existing is not None:
        check_existing(index_dir, existing, extractor)
    index_dir.mkdir(parents=True, exist_ok=True)
    state = open_state(index_dir, extractor, job.add, log)
    skipped = [dict(row=s.row, image=s.image, reason=s.reason) for s in job.skipped_rows]
    for s in job.skipped_rows:
        log(f"skipped {_where(s.row, s.image)}: {s.reason}")
    notes = _column_notes(job)
    existing_keys = set(existing["metadata"]["path"]) if existing is not None else set()
    new_records = []
    for r in job.records:
        key = str(r.path.resolve())
        if key in existing_keys:
            skipped.append(dict(row=r.row, image=r.image, reason="already in the index"))
            continue
        new_records.append((key, r))
    added, resumed, extract_seconds, ray_info, failed = _extract(index_dir, job, extractor, new_records)
    by_key = {k: r for k, r in new_records}
    skipped.extend(dict(row=d["row"], image=d["image"], reason=d["reason"]) for k, d in failed.items() if k in by_key)
    _kill_point("extracted")

    parts = _load_parts(index_dir, extractor, log, opts.compact.max_local)
    if existing is not None and not parts:
        # nothing new to add (all already there, or none could be used): the index stays as it is
        shutil.rmtree(index_dir / BUILDING, ignore_errors=True)
        log(f"{index_dir}: no new image to add; the index is unchanged")
        return BuildReport(str(index_dir), len(existing["metadata"]), 0, resumed, skipped,
                           time.perf_counter() - job.t_start, extract_seconds, ray_info, notes=notes)
    # assembled in the metadata's order, whichever order the parts were written in (Ray, resumes)
    position = {k: i for i, (k, _) in enumerate(new_records)}
    parts.sort(key=lambda p: position.get(str(p["keys"][0]), -1))
    old_radius = read_manifest(index_dir).confidence_radius_km if existing is not None else None
    try:
        _finalize(index_dir, job.images_dir, extractor, parts, by_key, existing, skipped, opts, state, job.fmt,
                  job.metadata, job.from_exif, job.allow_outside, log=log)
    except OSError:  # a full disk, say: the half-written staging folder goes; the checkpoints stay for --resume
        if not (index_dir / STAGING / MANIFEST).exists():
            shutil.rmtree(index_dir / STAGING, ignore_errors=True)
        raise
    radius = opts.confidence_radius_km or old_radius
    if radius:  # the radius the confidence is about: as asked, else as the index had it
        from delg_geo.retrieval.calibrate import set_confidence_radius

        set_confidence_radius(index_dir, radius)
    m = read_manifest(index_dir)
    calibration = _calibrate(index_dir, m.num_images, opts, log)
    return BuildReport(str(index_dir), m.num_images, added, resumed, skipped, time.perf_counter() - job.t_start,
                       extract_seconds, ray_info, calibration, notes=notes)


def _column_notes(job: _Job) -> list[str]:
    """Say which of the collection's columns are kept under another name (they clash with the index's own)."""
    from index_builder.finish import renamed_columns

    renamed = renamed_columns(job.records)
    if not renamed:
        return []
    note = ("the metadata's column(s) " + ", ".join(f"{k!r} are kept as {v!r}" for k, v in renamed.items())
            + " in metadata.csv (the index uses those names itself)")
    job.log(note)
    return [note]


def _extract(index_dir: Path, job: _Job, extractor, new_records: list) -> tuple[int, int, float, dict | None, dict]:
    """Extract the images not yet checkpointed (here, or on Ray workers), a part at a time.
    Returns (added, resumed, extraction seconds, Ray's report, failures by key)."""
    log, opts = job.log, job.opts
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

    if job.ray is not None:  # Ray workers write the parts; the loop below then has nothing to do
        from index_builder.ray_build import extract_on_ray

        added, ray_info = extract_on_ray(
            index_dir, [k for k, _ in new_records], todo, done, next_part, job.model, extractor, opts, job.ray,
            record_failure, log,
        )
        todo = []
    try:
        for res in iter_extract([str(r.path) for _, r in todo], extractor, batch_size=opts.batch_size,
                                workers=opts.workers, progress="index" if opts.progress and todo else False):
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
    except KeyboardInterrupt:
        raise DelgGeoError(
            f"interrupted: {added + resumed} images are checkpointed in {index_dir / BUILDING}; "
            "continue with the same command and --resume"
        ) from None
    return added, resumed, time.perf_counter() - t_extract, ray_info, failed

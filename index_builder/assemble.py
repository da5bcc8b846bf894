"""The final step of every build: from extracted parts to a complete compact index.

``assemble_index`` is the one function that writes an index. The single-process build, the Ray
build, ``index add``, ``index compact`` (format 1 -> 2) and ``tools/bench_scale.py`` all call it.
It streams: parts are read one at a time (a ``Part`` loader per checkpoint or shard file), so
memory stays bounded by one part plus the training samples, whatever the collection's size.

1. **Train** on a sample (``CompactOptions.train_images`` images, ``train_local`` local
   descriptors, drawn from parts in a seeded random order): PCA whitening of the global descriptor
   to ``global_dim``, and the local codec (``delg_geo.index.store``). With ``base`` (an existing compact
   index) nothing is refitted: its whitening and codec encode the new parts.
2. **Write** every part: global vectors as float16, keypoints as uint16, local codes, metadata,
   appended to ``.npy`` files in ``INDEX_DIR/.staging``.
3. **Index**: exact (flat, built when the index is opened) up to ``exact_limit`` images; above,
   IVF-PQ (or HNSW over PQ) trained on a random sample of the stored vectors, then every vector
   added in chunks. The choice and its parameters go in the manifest (``search``).
4. **Manifest** last, then the staged files are moved into place (``swap_staging``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from delg_geo.core.errors import DelgGeoError, IndexFormatError
from index_builder.codebook import (  # noqa: F401 (public here too)
    ENTRIES_PER_WORD, MAX_WORDS, MIN_POINTS_PER_WORD, MIN_WORDS, _asmk_from_codes, _base_codebook, asmk_sample_size,
    asmk_words_for, fit_codebook, stored_feature_sample,
)
from index_builder.npy_appender import NpyAppender
from index_builder.swap import swap_staging  # noqa: F401 (public here too)
from index_builder.work import BUILDING, STAGING, _kill_point  # noqa: F401 (public here too)
from delg_geo.index.geo_index import (
    DEFAULT_EXACT_LIMIT,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    choose_index_type,
    faiss_params,
    library_versions,
    new_faiss,
    now_iso,
    read_manifest,
    write_atomic,
)
from delg_geo.index.store import LocalCodec, encode_keypoints, fit_local_codec, keypoint_unit
from delg_geo.index.whitening import Whitening, fit_pca_whitening

@dataclass
class CompactOptions:
    """How the index is compressed (the defaults, and how they were chosen: docs/index-format.md)."""

    index_type: str = "auto"  # auto | flat | ivfpq | hnsw
    exact_limit: int = DEFAULT_EXACT_LIMIT
    global_dim: int = 256  # PCA-whitened global descriptor, stored float16
    whitening_power: float = 0.5
    whitening_shrinkage: float = 0.1
    whitening_min_images: int = 100  # fewer: no whitening (too little data to fit it)
    local_codec: str = "pca-int8"  # float16 | pca-int8 | pca-binary | pq
    local_dim: int | None = 48  # after PCA (None: the model's dimension)
    pq_m: int | None = None
    max_local: int = 500  # local features kept per image (the highest-attention ones)
    keep_raw: bool = False  # also store the model's float32 global descriptors
    asmk: bool = True  # an ASMK inverted file over the local features (delg_geo/index/asmk.py)
    asmk_words: int | None = None  # codebook size; None: sized to the collection (asmk_words_for)
    asmk_coarse: int = 256  # the codebook's coarse cells (its words are split among them)
    asmk_train: int = 2_000_000  # at most this many local descriptors to fit the codebook on
    train_images: int = 50_000
    train_local: int = 200_000
    seed: int = 0


@dataclass
class ModelInfo:
    model_id: str
    fingerprint: str
    local_dim: int
    needs_whitening: bool = False
    config: dict = field(default_factory=dict)
    local_features: str = "delg"  # the model's own, or a learned type (``index build --local``)
    local_fingerprint: str = ""
    local_config: dict = field(default_factory=dict)

    @classmethod
    def of(cls, extractor) -> "ModelInfo":
        local = getattr(extractor, "local_features", "delg")
        return cls(extractor.model_id, extractor.fingerprint, int(extractor.local_dim),
                   bool(getattr(extractor, "needs_whitening", False)),
                   getattr(getattr(extractor, "config", None), "to_dict", lambda: {})(),
                   local, "" if local == "delg" else getattr(extractor, "local_fingerprint", ""),
                   dict(getattr(extractor, "local_config", {}) or {}))


@dataclass
class Part:
    """Extracted images, in index order. Either raw (``global_raw``, ``descriptors``, as the model
    gives them) or already in the index's spaces (``global_vectors`` whitened and L2-normalised,
    ``local_projected`` projected by the codec, or ``local_codes`` encoded by it), as synthetic
    distractors are generated."""

    metadata: pd.DataFrame  # image, path, lat, lon, width, height, extra columns
    counts: np.ndarray  # (n,) local features per image
    keypoints: np.ndarray  # (m, 2) pixels
    global_raw: np.ndarray | None = None  # (n, G)
    descriptors: np.ndarray | None = None  # (m, D), best-first within each image
    scores: np.ndarray | None = None  # (m,) attention, to order features when given
    global_vectors: np.ndarray | None = None  # (n, d)
    local_projected: np.ndarray | None = None  # (m, dim)
    local_codes: np.ndarray | None = None  # (m, code width): already encoded by the index's codec
    # ASMK entries already aggregated (image within the part, word, packed signature), as
    # synthetic distractors come; else they are computed from the kept local features
    asmk_entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.counts)

    def keep_rows(self, max_local: int) -> np.ndarray:
        """Rows of the best ``max_local`` features of every image (by score when known)."""
        return best_feature_rows(self.counts, self.scores, max_local)


def best_feature_rows(counts: np.ndarray, scores: np.ndarray | None, max_local: int) -> np.ndarray:
    """Rows of the best ``max_local`` local features of every image (highest score first when
    scores are known, else the first ones), in their original order. Checkpoints keep only
    these (``build._write_part``) and the index keeps them again: the same rows either way."""
    counts = np.asarray(counts, np.int64)
    if len(counts) == 0 or int(np.max(counts)) <= max_local:
        return np.arange(int(np.sum(counts)), dtype=np.int64)  # every feature is kept
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = []
    for i in range(len(counts)):
        a, b = off[i], off[i + 1]
        if scores is not None and b - a > max_local:
            rows.append(a + np.sort(np.argsort(-scores[a:b], kind="stable")[:max_local]))
        else:
            rows.append(np.arange(a, min(b, a + max_local)))
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


PartLoader = Callable[[], Part]


def _sample(loaders: Sequence[PartLoader], opts: CompactOptions, log) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Global raw descriptors and local descriptors from a seeded random subset of parts, put
    together in index order (so a build cut into other parts, as Ray cuts it, trains the same)."""
    rng = np.random.default_rng(opts.seed)
    got, n_img, n_loc = {}, 0, 0
    for j in rng.permutation(len(loaders)):
        p = loaders[int(j)]()
        if p.global_raw is None or p.descriptors is None:
            continue
        rows = p.keep_rows(opts.max_local)
        got[int(j)] = (np.asarray(p.global_raw, np.float32), np.asarray(p.descriptors[rows], np.float32))
        n_img += len(p)
        n_loc += len(rows)
        if n_img >= opts.train_images and n_loc >= opts.train_local:
            break
    if not got:
        return None, None
    g = np.concatenate([got[j][0] for j in sorted(got)])[: max(opts.train_images, 1)]
    loc = np.concatenate([got[j][1] for j in sorted(got)])
    if len(loc) > opts.train_local:
        loc = loc[np.sort(rng.choice(len(loc), opts.train_local, replace=False))]
    log(f"training on {len(g)} global and {len(loc)} local descriptors")
    return g, loc


def assemble_index(
    index_dir: str | Path,
    loaders: Sequence[PartLoader],
    model: ModelInfo,
    *,
    options: CompactOptions | None = None,
    base: str | Path | None = None,
    skipped: list | None = None,
    sources: list | None = None,
    created: str | None = None,
    build_id: str = "",
    model_path: str = "",
    log=print,
    progress: bool = False,
    add_asmk: bool = False,
    expected_images: int | None = None,
    codebook=None,
) -> Manifest:
    """Write a complete compact index at ``index_dir`` from ``loaders`` (see the module docstring).

    ``base``: an existing compact index whose images come first and whose whitening and codec are
    reused (``index add``; it may be ``index_dir`` itself). ``skipped`` and ``sources`` are the
    manifest's complete lists (the caller merges the base's). A base keeps its ASMK inverted file
    (same codebook) or its lack of one, unless ``add_asmk`` (``index compact``) fits one on its
    stored features. ``expected_images`` (the whole index's size, where the caller knows it)
    sizes a new codebook; ``codebook`` imposes one (``tools/bench_scale.py``).
    """
    opts = options or CompactOptions()
    index_dir = Path(index_dir)
    base_m = read_manifest(base) if base is not None else None
    if base_m is not None and base_m.format_version < 2:
        raise IndexFormatError(f"{base}: format {base_m.format_version}; pass it as a part (legacy_part) instead")
    if not opts.asmk:
        codebook = None
    wh, wh_info, codec, codebook = _encoders(loaders, model, opts, base, base_m, add_asmk, expected_images, codebook, log)
    staging = index_dir / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    out = _StagedArrays(staging, wh, codec, codebook, opts.keep_raw)
    if base_m is not None:
        _copy_base(Path(base), out.write, keep_raw=opts.keep_raw)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loaders), desc="assemble", unit="part")
    for load in loaders:
        _append_part(out, load(), opts, wh, codec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    md, counts, asmk_info = out.close()
    if len(md) == 0:
        shutil.rmtree(staging)
        raise DelgGeoError(f"no image could be indexed ({len(skipped or [])} skipped); nothing written to {index_dir}")
    md = md.drop(columns=["id"], errors="ignore")
    md.insert(0, "id", np.arange(len(md)))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    index_type, params = _write_search(staging, len(md), wh.out_dim, opts, log)
    md.to_csv(staging / "metadata.csv", index=False)
    _kill_point("staging")
    wh.save(staging / "whitening.npz")
    codec.save(staging / "local_codec.npz")
    np.save(staging / "local_offsets.npy", offsets)
    all_skipped = list(skipped or [])
    pd.DataFrame(all_skipped, columns=["row", "image", "reason"]).to_csv(staging / "skipped.csv", index=False)
    manifest = _manifest(staging, model, wh, wh_info, codec, opts, index_type, params, asmk_info, len(md),
                         int(offsets[-1]), all_skipped, sources, build_id, model_path,
                         (base_m.created if base_m else None) or created or now_iso())
    write_atomic(staging / MANIFEST, manifest.to_json())
    _kill_point("staged")
    swap_staging(index_dir)
    return manifest


def _encoders(loaders, model: ModelInfo, opts: CompactOptions, base, base_m, add_asmk: bool, expected_images, codebook,
              log):
    """(whitening, its manifest entry, the local codec, the ASMK codebook or None): a base's own,
    or fitted on a seeded sample of the parts."""
    if base_m is not None:
        base = Path(base)
        wh = Whitening.load(base / "whitening.npz")
        codec = LocalCodec.load(base / "local_codec.npz")
        if opts.asmk and codebook is None and (base_m.asmk or add_asmk):
            codebook = _base_codebook(base, base_m, codec, opts, log, expected_images)
        return wh, dict(base_m.whitening), codec, codebook
    words = asmk_words_for(expected_images, opts.max_local, opts)
    # the codebook may want more local descriptors than the codec; the codec takes a subsample
    g_sample, l_sample = _sample(loaders, replace(opts, train_local=asmk_sample_size(words, opts)) if opts.asmk else opts, log)
    if g_sample is None:
        raise DelgGeoError("no raw features to train the index on")
    if model.needs_whitening and len(g_sample) >= opts.whitening_min_images:
        wh = fit_pca_whitening(g_sample, dim=opts.global_dim, power=opts.whitening_power,
                               shrinkage=opts.whitening_shrinkage)
        wh_info = dict(kind="pca", power=opts.whitening_power, shrinkage=opts.whitening_shrinkage,
                       dim=wh.out_dim, fitted_on=len(g_sample))
    else:
        wh = Whitening.identity(g_sample.shape[1])
        wh_info = dict(kind="identity", dim=wh.out_dim)
        if model.needs_whitening:
            wh_info["reason"] = (f"{len(g_sample)} images, fewer than the {opts.whitening_min_images} "
                                 "needed to fit PCA whitening")
    codec_sample = l_sample
    if len(l_sample) > opts.train_local:
        pick = np.random.default_rng(opts.seed).choice(len(l_sample), opts.train_local, replace=False)
        codec_sample = l_sample[np.sort(pick)]
    codec = fit_local_codec(codec_sample, opts.local_codec, opts.local_dim, opts.pq_m, seed=opts.seed)
    if opts.asmk and codebook is None and len(l_sample):
        codebook = fit_codebook(codec.decode(codec.encode(l_sample)), words, opts, log)
    return wh, wh_info, codec, codebook


class _StagedArrays:
    """The growing arrays of the staged index (global vectors, keypoints, codes, optionally the
    raw global descriptors and the inverted file), appended image batch by image batch."""

    def __init__(self, staging: Path, wh, codec, codebook, keep_raw: bool):
        from index_builder.inverted_file import InvertedFileWriter

        self.codec = codec
        self.g = NpyAppender(staging / "global.npy", np.float16, wh.out_dim)
        self.kp = NpyAppender(staging / "local_keypoints.npy", np.uint16, 2)
        self.codes = NpyAppender(staging / "local_codes.npy", codec.code_dtype, codec.code_width)
        self.raw = NpyAppender(staging / "global_raw.npy", np.float32, wh.in_dim) if keep_raw else None
        self.asmk = InvertedFileWriter(staging, codebook) if codebook is not None else None
        self.counts: list[np.ndarray] = []
        self.metas: list[pd.DataFrame] = []

    def write(self, meta, counts, g16, kp16, codes, raw=None, asmk_entries=None) -> None:
        if self.asmk is not None:
            if asmk_entries is not None:
                self.asmk.add_entries(len(counts), *asmk_entries)
            else:
                _asmk_from_codes(self.asmk, self.codec, np.asarray(counts, np.int64), codes)
        self.g.append(g16)
        self.kp.append(kp16)
        self.codes.append(codes)
        if self.raw is not None:
            if raw is None:
                raise DelgGeoError("--keep-raw needs raw global descriptors for every image")
            self.raw.append(raw)
        self.counts.append(np.asarray(counts, np.int64))
        self.metas.append(meta)

    def close(self) -> tuple[pd.DataFrame, np.ndarray, dict]:
        """(the metadata of every image, local features per image, the inverted file's manifest entry)."""
        for a in (self.g, self.kp, self.codes) + ((self.raw,) if self.raw else ()):
            a.close()
        md = pd.concat(self.metas, ignore_index=True) if self.metas else pd.DataFrame()
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        asmk_info = self.asmk.finish() if self.asmk is not None and len(md) else {}
        return md, counts, asmk_info


def _append_part(out: _StagedArrays, p: Part, opts: CompactOptions, wh, codec) -> None:
    """One part's images, whitened and encoded, each keeping its best ``max_local`` features."""
    rows = p.keep_rows(opts.max_local)
    off = np.concatenate([[0], np.cumsum(p.counts)])
    counts = np.minimum(np.asarray(p.counts, np.int64), opts.max_local)
    if p.global_vectors is not None:
        g = np.asarray(p.global_vectors, np.float32)
    else:
        g = wh.apply(np.asarray(p.global_raw, np.float32))
    if p.local_codes is not None:
        codes = np.asarray(p.local_codes[rows], codec.code_dtype)
    elif p.local_projected is not None:
        codes = codec.encode_projected(p.local_projected[rows])
    else:
        codes = codec.encode(np.asarray(p.descriptors[rows], np.float32))
    md = p.metadata.reset_index(drop=True)
    units = np.repeat(keypoint_unit(md["width"].to_numpy(), md["height"].to_numpy()), counts)
    kp = encode_keypoints(np.asarray(p.keypoints[rows], np.float64), units[:, None]) if len(rows) else \
        np.zeros((0, 2), np.uint16)
    assert int(counts.sum()) == len(rows) and int(off[-1]) == len(p.keypoints)
    out.write(md, counts, g.astype(np.float16), kp, codes, p.global_raw, p.asmk_entries)


def _write_search(staging: Path, n: int, gdim: int, opts: CompactOptions, log) -> tuple[str, dict]:
    """The global index: exact search over ``global.npy``, or a trained FAISS index in ``global.faiss``."""
    import faiss

    index_type = choose_index_type(n, opts.index_type, opts.exact_limit)
    params = faiss_params(n, gdim, index_type)
    if index_type != "flat":
        gv = np.load(staging / "global.npy", mmap_mode="r")
        rng = np.random.default_rng(opts.seed)
        take = np.sort(rng.choice(n, min(n, params.get("train_size", 50_000)), replace=False))
        log(f"training {index_type} on {len(take)} of {n} vectors: {params}")
        fidx = new_faiss(gdim, params, np.asarray(gv[take], np.float32))
        for a in range(0, n, 100_000):
            fidx.add(np.asarray(gv[a : a + 100_000], np.float32))
        faiss.write_index(fidx, str(staging / "global.faiss"))
        del gv
    return index_type, params


def _manifest(staging: Path, model: ModelInfo, wh, wh_info: dict, codec, opts: CompactOptions, index_type: str,
              params: dict, asmk_info: dict, n: int, n_local: int, skipped: list, sources, build_id: str,
              model_path: str, created: str) -> Manifest:
    """The manifest of the staged files: their sizes, checksums and stamps, and how they were made."""
    from delg_geo.index.integrity import file_checksum, file_stamp

    files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.name != MANIFEST}
    return Manifest(
        model_id=model.model_id,
        model_fingerprint=model.fingerprint,
        global_dim=int(wh.in_dim),
        search_dim=int(wh.out_dim),
        local_dim=int(model.local_dim),
        num_images=n,
        num_local_features=n_local,
        index_type=index_type,
        model_config=model.config,
        local_features=model.local_features,
        local_fingerprint=model.local_fingerprint,
        local_config=model.local_config,
        whitening=wh_info,
        files=files,
        checksums={name: file_checksum(staging / name) for name in files},
        stamps={name: file_stamp(staging / name, build_id) for name in files},  # checked on open (crosscheck.py)
        skipped=skipped,
        sources=list(sources or []),
        versions=library_versions(),
        build_id=build_id,
        model_path=model_path,
        created=created,
        updated=now_iso(),
        format_version=FORMAT_VERSION,
        search=dict(params, requested=opts.index_type, exact_limit=opts.exact_limit, vectors="global.npy (float16)"),
        local=dict(codec.info(), max_features=opts.max_local, keypoints="uint16"),
        asmk=asmk_info,
    )


def _copy_base(base: Path, write, keep_raw: bool, chunk: int = 20_000) -> None:
    """Feed a compact index's records, as they are stored, to ``write``."""
    md = pd.read_csv(base / "metadata.csv", keep_default_na=False, na_values=[""]).drop(columns=["id"])
    off = np.load(base / "local_offsets.npy")
    g = np.load(base / "global.npy", mmap_mode="r")
    kp = np.load(base / "local_keypoints.npy", mmap_mode="r")
    codes = np.load(base / "local_codes.npy", mmap_mode="r")
    raw = np.load(base / "global_raw.npy", mmap_mode="r") if keep_raw and (base / "global_raw.npy").exists() else None
    if keep_raw and raw is None:
        raise DelgGeoError(f"{base} was built without --keep-raw; its raw descriptors cannot be kept")
    for a in range(0, len(md), chunk):
        b = min(a + chunk, len(md))
        write(md.iloc[a:b], np.diff(off[a : b + 1]), np.asarray(g[a:b]), np.asarray(kp[off[a] : off[b]]),
              np.asarray(codes[off[a] : off[b]]), None if raw is None else np.asarray(raw[a:b]))


def legacy_loaders(index_dir: str | Path, chunk: int = 2000) -> list[PartLoader]:
    """A format-1 index (raw global descriptors, float16 local descriptors) as raw parts."""
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    if m.format_version != 1:
        raise IndexFormatError(f"{index_dir} is format {m.format_version}, not 1")
    md = pd.read_csv(index_dir / "metadata.csv", keep_default_na=False, na_values=[""]).drop(columns=["id"])
    off = np.load(index_dir / "local_offsets.npy")

    def loader(a, b):
        def load() -> Part:
            g = np.load(index_dir / "global_raw.npy", mmap_mode="r")
            mm = lambda name: np.load(index_dir / name, mmap_mode="r")[off[a] : off[b]]  # noqa: E731
            return Part(metadata=md.iloc[a:b], counts=np.diff(off[a : b + 1]), keypoints=np.asarray(mm("local_keypoints.npy")),
                        global_raw=np.asarray(g[a:b], np.float32), descriptors=np.asarray(mm("local_descriptors.npy")),
                        scores=np.asarray(mm("local_scores.npy")))
        return load

    return [loader(a, min(a + chunk, len(md))) for a in range(0, len(md), chunk)]


def compact_index(src: str | Path, dst: str | Path, options: CompactOptions | None = None, log=print) -> Manifest:
    """Convert a format-1 index into a compact (format-2) one at ``dst``, without re-extracting; a
    compact index is copied with what it lacks added (the ASMK inverted file of an index built
    before it existed), its whitening, codec and features unchanged."""
    m = read_manifest(src)
    dst = Path(dst)
    if (dst / MANIFEST).exists() or (dst.exists() and any(dst.iterdir())):
        raise DelgGeoError(f"{dst} is not empty; choose a new folder")
    from delg_geo.index.lock import storage_errors, writer_lock

    with storage_errors(dst), writer_lock(dst, "delg-geo index compact"):
        return _compact(src, dst, m, options, log)


def _compact(src, dst: Path, m: Manifest, options, log) -> Manifest:
    model = ModelInfo(m.model_id, m.model_fingerprint, m.local_dim, m.whitening.get("kind") == "pca" or
                      "reason" in m.whitening, m.model_config, m.local_features, m.local_fingerprint, m.local_config)
    if m.format_version >= 2:
        opts = replace(options or CompactOptions(), max_local=int(m.local.get("max_features", 500)))
        return assemble_index(dst, [], model, options=opts, base=src, skipped=m.skipped,
                              sources=m.sources + [dict(compacted_from=str(Path(src).resolve()), at=now_iso())],
                              created=m.created, build_id=m.build_id, model_path=m.model_path, log=log, add_asmk=True)
    return assemble_index(dst, legacy_loaders(src), model, options=options, skipped=m.skipped,
                          sources=m.sources + [dict(compacted_from=str(Path(src).resolve()), at=now_iso())],
                          created=m.created, log=log)

"""Stage 2 — index: the on-disk layout of a delg-geo index, and the FAISS global index.

An index folder (format 2, the compact format) holds plain files a user can read::

    manifest.json           written last, atomically: the index is whole only when it exists
    metadata.csv            id, image, path, lat, lon, width, height, then the collection's extra columns
    whitening.npz           PCA whitening to at most 256-D, fitted on (a sample of) this collection
    global.npy              (N, d) float16: whitened, L2-normalised global descriptors
    global.faiss            only for ivfpq: IVF-PQ over global.npy, trained on a sample; its
                            top candidates are re-scored exactly from global.npy
    local_offsets.npy       (N + 1,) int64: image i owns rows offsets[i]:offsets[i+1]
    local_keypoints.npy     (M, 2) uint16 pixels (see delg_geo.index.store)
    local_codes.npy         (M, C) local descriptor codes (see delg_geo.index.store)
    local_codec.npz         how to decode them
    skipped.csv             row, image, reason for everything that was not indexed
    global_raw.npy          only with --keep-raw: (N, G) float32 as the model gave them

An exact (flat) index is built in memory from ``global.npy`` when the index is opened. The
local arrays and ``global.npy`` are memory-mapped, so a query reads only its candidates' rows.

Format 1 (delg-geo before the compact store: ``global_raw.npy``, ``global.faiss`` for every
index type, float32 keypoints, float16 ``local_descriptors.npy`` and ``local_scores.npy``) is
still read; ``delg-geo index compact`` converts it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.errors import IndexFormatError
from delg_geo.index.integrity import damaged_message, faiss_problem, file_problem, local_features_problem, reference_norm
from delg_geo.index.metadata_table import MetadataTable
from delg_geo.index.rowfile import NpyRows

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

#: Above this many images, ``index_type="auto"`` switches from exact search to IVF-PQ.
DEFAULT_EXACT_LIMIT = 100_000


@dataclass
class Manifest:
    model_id: str
    model_fingerprint: str
    global_dim: int  # raw descriptor dimension
    search_dim: int  # after whitening
    local_dim: int
    num_images: int
    num_local_features: int
    index_type: str
    model_config: dict = field(default_factory=dict)
    # the local features verification uses: "delg" (the model's own) or a learned type
    local_features: str = "delg"
    local_fingerprint: str = ""  # weights + settings of a learned type ("" for delg)
    local_config: dict = field(default_factory=dict)
    whitening: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> size in bytes, checked on load
    checksums: dict = field(default_factory=dict)  # name -> "xxh3_128:hex" (see delg_geo.index.integrity)
    stamps: dict = field(default_factory=dict)  # name -> digest of the build id and sampled blocks (crosscheck.py)
    skipped: list = field(default_factory=list)  # [{"row", "image", "reason"}]
    sources: list = field(default_factory=list)  # how each batch of images came in
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    build_id: str = ""  # the run that wrote this manifest (its checkpoints carry the same id)
    model_path: str = ""  # --model PATH: the SavedModel folder the index was built with
    format_version: int = 1  # a manifest without the field is format 1
    search: dict = field(default_factory=dict)  # the global index: type and parameters
    local: dict = field(default_factory=dict)  # the local store: codec, features per image
    # ``confidence`` is the probability of being within this radius of the truth (calibrate.py)
    confidence_radius_km: float = 0.1
    calibration: dict = field(default_factory=dict)  # calibration.json: size, rule, fit summary
    asmk: dict = field(default_factory=dict)  # the local-feature inverted file (asmk.py), when built
    adapt: dict = field(default_factory=dict)  # `index adapt`: the learned weights' file, digest and recipe

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_json(self) -> str:
        from delg_geo.core.jsonio import dumps

        return dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = MANIFEST) -> "Manifest":
        """The manifest ``d`` (parsed JSON), once its schema is checked (``manifest_schema``:
        :class:`IndexFormatError` naming ``where`` and the field); unknown fields are ignored."""
        from delg_geo.index.manifest_schema import check_manifest

        check_manifest(d, where)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    import faiss
    import pandas
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    from delg_geo import __version__

    try:  # from the installed metadata: importing TensorFlow only for its version costs seconds
        tf_version = _version("tensorflow")
    except PackageNotFoundError:
        tf_version = "?"
    out = {
        "delg_geo": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "tensorflow": tf_version,
    }
    try:
        import pydegensac  # noqa: F401
        from importlib.metadata import version

        out["pydegensac"] = version("pydegensac")
    except Exception:  # noqa: BLE001
        pass
    return out


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(index_dir: str | Path) -> Manifest:
    """The index's manifest, parsed and checked against its schema, without looking at the files it
    lists (:func:`read_manifest` does); :class:`IndexFormatError` when there is none or it is unusable."""
    index_dir = Path(index_dir)
    if not index_dir.exists():
        raise IndexFormatError(f"index not found: {index_dir} (build one with `delg-geo index build`)")
    if not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir} is a file, not an index folder")
    mpath = index_dir / MANIFEST
    if mpath.is_dir():
        raise IndexFormatError(f"damaged index {index_dir}: {MANIFEST} is a folder, not a file; restore it from a "
                               "backup, or rebuild the index")
    if not mpath.exists():
        hint = (
            "an interrupted build? finish it with `delg-geo index build ... --resume`"
            if (index_dir / ".building").exists() or (index_dir / ".staging").exists()
            else "an interrupted adapt? finish it with `delg-geo index adapt --index DIR`"
            if (index_dir / ".adapt" / "next" / MANIFEST).exists()
            else "is this a delg-geo index folder?"
        )
        raise IndexFormatError(f"{index_dir} is not a complete index: no {MANIFEST} ({hint})")
    try:
        d = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IndexFormatError(f"{mpath}: corrupt manifest ({e}); restore it from a backup, or rebuild the index") from None
    m = Manifest.from_dict(d, mpath)
    if m.format_version not in READABLE_FORMATS:
        raise IndexFormatError(
            f"{index_dir}: index format {m.format_version} is not one this delg-geo reads "
            f"({', '.join(map(str, READABLE_FORMATS))}); "
            + ("upgrade delg-geo" if m.format_version > FORMAT_VERSION else "rebuild the index")
        )
    return m


def read_manifest(index_dir: str | Path) -> Manifest:
    """The index's manifest (:func:`load_manifest`), once every file it lists is there, inside the
    index folder, with the size it records."""
    m = load_manifest(index_dir)
    index_dir = Path(index_dir)
    for name, size in m.files.items():
        why = file_problem(index_dir, name, size, None)
        if why == "missing":
            raise IndexFormatError(f"{index_dir}: {name} is missing; the index is damaged, rebuild it")
        if why:
            raise IndexFormatError(f"{index_dir}: {name} {why}; the index is damaged or was modified, rebuild it")
    return m


# -- FAISS ----------------------------------------------------------------------------------

def choose_index_type(n: int, requested: str = "auto", exact_limit: int = DEFAULT_EXACT_LIMIT) -> str:
    if requested not in ("auto", "flat", "ivfpq", "hnsw"):
        raise ValueError(f"unknown index type {requested!r}: use auto, flat, ivfpq or hnsw")
    if requested != "auto":
        return requested
    return "flat" if n <= exact_limit else "ivfpq"


def faiss_params(n: int, d: int, index_type: str) -> dict:
    """The compressed index's parameters for ``n`` vectors of dimension ``d`` (recorded in the manifest)."""
    if index_type == "flat":
        return dict(type="flat")
    pq_m = next(mm for mm in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d % mm == 0 and mm <= max(1, d // 4))
    if index_type == "hnsw":
        return dict(type="hnsw", scalar="8bit", M=32, ef_construction=80, ef_search=128, refine=4)
    # sqrt(n) lists: k-means on a 2-core machine stays within minutes at 5 million images, and the
    # exact re-scoring of the top 4k makes up for the PQ codes. Half the lists are probed: whitened
    # descriptors are nearly isotropic, so a photo's true neighbours spread over many lists, and
    # probing few of them loses them (docs/notes/history.md)
    nlist = int(max(1, min(np.sqrt(n), n // 39)))
    return dict(type="ivfpq", nlist=nlist, pq_m=pq_m, pq_bits=8, nprobe=max(min(nlist, 32), nlist // 2), refine=4,
                train_size=int(min(n, max(40 * nlist, 20_000))))


def build_faiss(vectors: np.ndarray, index_type: str, params: dict | None = None, train: np.ndarray | None = None):
    """A CPU FAISS inner-product index over L2-normalised ``vectors``, trained on ``train`` (default: them)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    index = new_faiss(d, params or faiss_params(len(x), d, index_type), train if train is not None else x)
    index.add(x)
    return index


def new_faiss(d: int, params: dict, train: np.ndarray | None = None):
    """An empty (trained) FAISS index for ``params`` (see ``faiss_params``)."""
    import faiss

    kind = params["type"]
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        # HNSW over 8-bit scalar codes: over PQ codes its graph search lost a third of the true neighbours
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], params["pq_bits"],
                                 faiss.METRIC_INNER_PRODUCT)
        index.nprobe = params["nprobe"]
    else:
        raise ValueError(kind)
    index.train(np.ascontiguousarray(train, np.float32))
    return index


def to_device(index):
    """Move a flat index to the GPU(s) when FAISS sees any; otherwise return it unchanged."""
    import faiss

    try:
        ngpu = faiss.get_num_gpus()
    except AttributeError:
        ngpu = 0
    if ngpu <= 0:
        return index, "cpu"
    try:
        return faiss.index_cpu_to_all_gpus(index), f"gpu x{ngpu}"
    except Exception:  # noqa: BLE001 - an index type without GPU support stays on the CPU
        return index, "cpu"


def search_refined(index, vectors, q: np.ndarray, k: int, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` by exact inner product with ``vectors`` (an array, or a :class:`~delg_geo.index.rowfile.NpyRows`
    reader of ``global.npy``, indexed by sorted row numbers) among the compressed ``index``'s top ``k * refine``: (sims, ids), each (nq, k),
    -1 where fewer exist."""
    q = np.ascontiguousarray(q, np.float32)
    _, cand = index.search(q, min(len(vectors), k * refine))
    sims = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for r, row in enumerate(cand):
        row = np.unique(row[row >= 0])  # sorted: the file is read in order
        s = np.asarray(vectors[row], np.float32) @ q[r]
        top = np.argsort(-s, kind="stable")[:k]
        sims[r, : len(top)], ids[r, : len(top)] = s[top], row[top]
    return sims, ids


# -- reading ---------------------------------------------------------------------------------

class GeoIndex:
    """A complete index, opened for querying. Local features and global vectors are memory-mapped.

    Opening checks what is cheap (``check_files``): the checksum of ``metadata.csv`` and of every
    file up to 64 MB, the metadata's value ranges, and a sample of the FAISS vectors; a damaged
    index is refused with a message naming the file. Each candidate's local features are checked
    when they are read for verification (:meth:`candidate_problem`).
    """

    def __init__(self, index_dir: str | Path, device: str = "auto", check_files: bool = True):
        from delg_geo.index.lock import reading

        with reading(index_dir):  # a writer moving new files in waits, and we wait for it
            self._open(index_dir, device, check_files)

    def _open(self, index_dir: str | Path, device: str, check_files: bool) -> None:
        import faiss

        from delg_geo.index.store import LegacyLocalStore, LocalStore
        from delg_geo.index.whitening import Whitening

        self.path = Path(index_dir)
        self.manifest = m = read_manifest(self.path)
        if check_files:
            for name, size in m.files.items():
                why = file_problem(self.path, name, size, m.checksums.get(name), full=False, stamp=m.stamps.get(name),
                                   build_id=m.build_id)
                if why:
                    raise IndexFormatError(damaged_message(self.path, name, why))
        self.refine = 0
        self.global_vectors = None  # (N, d) float16 memory map (format 2)
        cpu_index = None
        if m.format_version == 1 or m.index_type != "flat":
            try:
                cpu_index = faiss.read_index(str(self.path / "global.faiss"))
            except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ trace
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                raise IndexFormatError(damaged_message(self.path, "global.faiss", f"cannot be read ({msg})")) from None
        try:
            # numbers in arrays, names read on demand: no table of Python strings (1.5 GB at 5 M photos)
            self.table = MetadataTable(self.path / "metadata.csv")
            self.sizes = self.table.sizes  # per image, for verification
            self.whitening = Whitening.load(self.path / "whitening.npz")
            if m.format_version == 1:
                self.local = LegacyLocalStore(self.path)
            else:
                self.global_vectors = np.load(self.path / "global.npy", mmap_mode="r")
                if cpu_index is None:  # exact: built here from the stored vectors
                    cpu_index = faiss.IndexFlatIP(int(self.global_vectors.shape[1]))
                    for a in range(0, len(self.global_vectors), 65536):
                        cpu_index.add(np.asarray(self.global_vectors[a : a + 65536], np.float32))
                else:
                    self.refine = int(m.search.get("refine", 0))
                    self._refine_rows = NpyRows(self.path / "global.npy")  # pread: RSS stays flat
                self.local = LocalStore(self.path, self.sizes[:, 0], self.sizes[:, 1])
        except IndexFormatError:
            raise
        except Exception as e:  # noqa: BLE001
            raise IndexFormatError(f"{self.path}: cannot read the index ({e}); rebuild it") from None
        self.offsets = self.local.offsets
        n = m.num_images
        if len(self.table) != n or cpu_index.ntotal != n or len(self.offsets) != n + 1:
            raise IndexFormatError(
                f"{self.path}: inconsistent index (manifest {n} images, metadata {len(self.table)}, "
                f"faiss {cpu_index.ntotal}, offsets {len(self.offsets) - 1}); rebuild it"
            )
        if self.global_vectors is not None and len(self.global_vectors) != n:
            raise IndexFormatError(damaged_message(self.path, "global.npy", f"holds {len(self.global_vectors)} vectors, not {n}"))
        codes = self.local.codes
        if np.any(np.diff(self.offsets) < 0) or self.offsets[0] != 0 or self.offsets[-1] != len(codes) \
                or len(self.local.keypoints) != len(codes):
            raise IndexFormatError(damaged_message(self.path, "local_offsets.npy", "does not match the local feature arrays"))
        why = faiss_problem(cpu_index, m.search_dim, self.path / "global_raw.npy", self.whitening)
        if why:
            raise IndexFormatError(damaged_message(self.path, "global.npy" if m.format_version >= 2 and m.index_type == "flat"
                                                   else "global.faiss", why))
        self.lats = self.table.lats
        self.lons = self.table.lons
        self.asmk = None  # the local-feature inverted file (delg_geo/index/asmk.py), when the index has one
        if m.asmk:
            from delg_geo.index.asmk import InvertedFile

            try:
                self.asmk = InvertedFile(self.path, n, m.asmk)
            except IndexFormatError:
                raise
            except Exception as e:  # noqa: BLE001
                raise IndexFormatError(f"{self.path}: cannot read the ASMK inverted file ({e}); rebuild the index") from None
        from delg_geo.index.crosscheck import index_problem

        self._norm_ref: float | None = None
        why = index_problem(self, cpu_index)  # files from another index, where no checksum was read
        if why:
            raise IndexFormatError(damaged_message(self.path, *why))
        #: files without a recorded checksum (an index built before delg-geo recorded them)
        self.unchecked = sorted(set(m.files) - set(m.checksums))
        self.faiss_index, self.device = (cpu_index, "cpu") if device == "cpu" else to_device(cpu_index)

    def __len__(self) -> int:
        return self.manifest.num_images

    @property
    def metadata(self):
        """The whole ``metadata.csv`` as a DataFrame, read on first use (batch work; a query
        needs only :attr:`lats`, :attr:`lons`, :attr:`sizes` and :meth:`image_name`)."""
        return self.table.frame

    def image_name(self, i: int) -> str:
        """The ``image`` column of indexed image ``i``, read from the file when asked for."""
        return self.table.image(int(i))

    def search_whitened(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids), each (nq, k), for whitened queries; compressed indexes re-score exactly."""
        if not self.refine:
            return self.faiss_index.search(np.ascontiguousarray(q, np.float32), k)
        return search_refined(self.faiss_index, self._refine_rows, q, k, self.refine)

    def global_rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), d) float32 whitened global descriptors of images ``ids`` (read, not mapped
        whole, on a compressed index)."""
        ids = np.asarray(ids, np.int64)
        order = np.argsort(ids)
        out = np.empty((len(ids), self.manifest.search_dim), np.float32)
        if self.global_vectors is None:
            raw = np.load(self.path / "global_raw.npy", mmap_mode="r")
            out[order] = self.whitening.apply(np.asarray(raw[ids[order]], np.float32))
        elif getattr(self, "_refine_rows", None) is not None:
            out[order] = self._refine_rows[ids[order]]
        else:
            out[order] = self.global_vectors[ids[order]]
        return out

    def search_vectors(self) -> np.ndarray:
        """(N, d) float32 whitened global descriptors of every image, as FAISS searches them."""
        if self.global_vectors is not None:
            return np.asarray(self.global_vectors, np.float32)
        return self.whitening.apply(np.load(self.path / "global_raw.npy"))

    def local_features(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (K, 2) float32 and descriptors (K, d) float32 of indexed image ``i``, decoded."""
        return self.local.features(i)

    def query_local(self, descriptors: np.ndarray) -> np.ndarray:
        """A query's local descriptors in the store's matching space (projected, never quantised)."""
        return self.local.query(descriptors)

    def image_size(self, i: int) -> tuple[int, int]:
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    @property
    def local_norm_ref(self) -> float:
        """The typical norm of this index's local descriptors (median over a spread sample)."""
        if self._norm_ref is None:
            self._norm_ref = reference_norm(self.local_features, len(self))
        return self._norm_ref

    def candidate_problem(self, i: int, kp: np.ndarray, desc: np.ndarray) -> str | None:
        """Why image ``i``'s local features (as :meth:`local_features` returned them) are damaged."""
        return local_features_problem(kp, desc, self.image_size(i), self.local_norm_ref)

    def damaged_images(self) -> list[tuple[int, str]]:
        """``(id, problem)`` of every image whose local features are damaged (reads them all)."""
        out = []
        for i in range(len(self)):
            kp, desc = self.local_features(i)
            why = self.candidate_problem(i, kp, desc)
            if why:
                out.append((i, why))
        return out

    def check_local(self, local: str, fingerprint: str) -> None:
        """Refuse a query whose local features are not the ones this index holds."""
        m = self.manifest
        if local != m.local_features or (local != "delg" and fingerprint != m.local_fingerprint):
            what = local if local == m.local_features else f"--local {local}"
            raise IndexFormatError(
                f"{self.path} holds {m.local_features!r} local features (built with --local {m.local_features}), "
                f"but the query uses {what}"
                + (f" with other settings (fingerprint {fingerprint[:12]} vs {m.local_fingerprint[:12]})" if local == m.local_features else "")
                + f"; query with --local {m.local_features} (or leave --local out: the index's choice is the default), "
                f"or rebuild the index with `delg-geo index build ... --local {local}`"
            )

    def check_model(self, model_id: str, fingerprint: str) -> None:
        m = self.manifest
        if model_id != m.model_id or fingerprint != m.model_fingerprint:
            raise IndexFormatError(
                f"{self.path} was built with model {m.model_id!r} (fingerprint {m.model_fingerprint[:12]}), "
                f"but the query uses {model_id!r} (fingerprint {fingerprint[:12]}); query with "
                f"--model {m.model_id} and the same settings, or rebuild the index with this model"
            )

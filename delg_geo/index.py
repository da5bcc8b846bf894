"""Stage 2 — index: the on-disk layout of a delg-geo index, and the FAISS global index.

An index folder holds plain files a user can read::

    manifest.json           written last, atomically: the index is whole only when it exists
    metadata.csv            id, image, path, lat, lon, then the collection's extra columns
    global_raw.npy          (N, G) float32 descriptors as the model gave them
    global.faiss            FAISS index over the whitened descriptors
    whitening.npz           PCA whitening fitted on this collection (identity for official DELG)
    local_offsets.npy       (N + 1,) int64: image i owns rows offsets[i]:offsets[i+1]
    local_keypoints.npy     (M, 2) float32, x/y pixels in the original image
    local_descriptors.npy   (M, D) float16, L2-normalised
    local_scores.npy        (M,) float16 attention
    skipped.csv             row, image, reason for everything that was not indexed

The local arrays are memory-mapped, so a query reads only its candidates' rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import IndexFormatError
from .integrity import check_metadata, damaged_message, faiss_problem, file_problem, local_features_problem, reference_norm

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DATA_FILES = (
    "metadata.csv",
    "global_raw.npy",
    "global.faiss",
    "whitening.npz",
    "local_offsets.npy",
    "local_keypoints.npy",
    "local_descriptors.npy",
    "local_scores.npy",
)

#: Above this many images, ``index_type="auto"`` switches from exact search to a compressed index.
DEFAULT_EXACT_LIMIT = 200_000


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
    whitening: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> size in bytes, checked on load
    checksums: dict = field(default_factory=dict)  # name -> "xxh3_128:hex" (see delg_geo.integrity)
    skipped: list = field(default_factory=list)  # [{"row", "image", "reason"}]
    sources: list = field(default_factory=list)  # how each batch of images came in
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    build_id: str = ""  # the run that wrote this manifest (its checkpoints carry the same id)
    model_path: str = ""  # --model PATH: the SavedModel folder the index was built with
    format_version: int = FORMAT_VERSION

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    import faiss
    import pandas
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    from . import __version__

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


def read_manifest(index_dir: str | Path) -> Manifest:
    index_dir = Path(index_dir)
    if not index_dir.exists():
        raise IndexFormatError(f"index not found: {index_dir} (build one with `delg-geo index build`)")
    mpath = index_dir / MANIFEST
    if not mpath.exists():
        hint = (
            "an interrupted build? finish it with `delg-geo index build ... --resume`"
            if (index_dir / ".building").exists() or (index_dir / ".staging").exists()
            else "is this a delg-geo index folder?"
        )
        raise IndexFormatError(f"{index_dir} is not a complete index: no {MANIFEST} ({hint})")
    try:
        m = Manifest.from_dict(json.loads(mpath.read_text()))
    except (ValueError, TypeError) as e:
        raise IndexFormatError(f"{mpath}: corrupt manifest ({e})") from None
    if m.format_version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{index_dir}: index format {m.format_version} is newer than this delg-geo understands "
            f"({FORMAT_VERSION}); upgrade delg-geo"
        )
    for name, size in m.files.items():
        p = index_dir / name
        if not p.exists():
            raise IndexFormatError(f"{index_dir}: {name} is missing; the index is damaged, rebuild it")
        if p.stat().st_size != size:
            raise IndexFormatError(
                f"{index_dir}: {name} has {p.stat().st_size} bytes, the manifest says {size}; "
                "the index is damaged or was modified, rebuild it"
            )
    return m


# -- FAISS ----------------------------------------------------------------------------------

def choose_index_type(n: int, requested: str = "auto", exact_limit: int = DEFAULT_EXACT_LIMIT) -> str:
    if requested not in ("auto", "flat", "ivfpq", "hnsw"):
        raise ValueError(f"unknown index type {requested!r}: use auto, flat, ivfpq or hnsw")
    if requested != "auto":
        return requested
    return "flat" if n <= exact_limit else "ivfpq"


def build_faiss(vectors: np.ndarray, index_type: str):
    """A CPU FAISS inner-product index over L2-normalised ``vectors``."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    elif index_type == "ivfpq":
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
        m = next(mm for mm in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d % mm == 0 and mm <= d)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nlist, 32)
    else:
        raise ValueError(index_type)
    index.add(x)
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


# -- reading ---------------------------------------------------------------------------------

class GeoIndex:
    """A complete index, opened for querying. Local features are memory-mapped.

    Opening checks what is cheap (``check_files``): the checksum of ``metadata.csv`` and of every
    file up to 64 MB, the metadata's value ranges, and a sample of the FAISS vectors; a damaged
    index is refused with a message naming the file. Each candidate's local features are checked
    when they are read for verification (:meth:`candidate_problem`).
    """

    def __init__(self, index_dir: str | Path, device: str = "auto", check_files: bool = True):
        import faiss
        import pandas as pd

        from .whitening import Whitening

        self.path = Path(index_dir)
        self.manifest = read_manifest(self.path)
        if check_files:
            for name, size in self.manifest.files.items():
                why = file_problem(self.path, name, size, self.manifest.checksums.get(name), full=False)
                if why:
                    raise IndexFormatError(damaged_message(self.path, name, why))
        try:
            cpu_index = faiss.read_index(str(self.path / "global.faiss"))
        except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ trace
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise IndexFormatError(damaged_message(self.path, "global.faiss", f"cannot be read ({msg})")) from None
        try:
            self.metadata = pd.read_csv(self.path / "metadata.csv", keep_default_na=False, na_values=[""])
            self.whitening = Whitening.load(self.path / "whitening.npz")
            self.offsets = np.load(self.path / "local_offsets.npy")
            self.keypoints = np.load(self.path / "local_keypoints.npy", mmap_mode="r")
            self.descriptors = np.load(self.path / "local_descriptors.npy", mmap_mode="r")
            self.scores = np.load(self.path / "local_scores.npy", mmap_mode="r")
        except IndexFormatError:
            raise
        except Exception as e:  # noqa: BLE001
            raise IndexFormatError(f"{self.path}: cannot read the index ({e}); rebuild it") from None
        n = self.manifest.num_images
        if len(self.metadata) != n or cpu_index.ntotal != n or len(self.offsets) != n + 1:
            raise IndexFormatError(
                f"{self.path}: inconsistent index (manifest {n} images, metadata {len(self.metadata)}, "
                f"faiss {cpu_index.ntotal}, offsets {len(self.offsets) - 1}); rebuild it"
            )
        check_metadata(self.metadata, self.path / "metadata.csv")
        if np.any(np.diff(self.offsets) < 0) or self.offsets[0] != 0 or self.offsets[-1] != len(self.descriptors) \
                or len(self.keypoints) != len(self.descriptors):
            raise IndexFormatError(damaged_message(self.path, "local_offsets.npy", "does not match the local feature arrays"))
        why = faiss_problem(cpu_index, self.manifest.search_dim, self.path / "global_raw.npy", self.whitening)
        if why:
            raise IndexFormatError(damaged_message(self.path, "global.faiss", why))
        self.lats = self.metadata["lat"].to_numpy(np.float64)
        self.lons = self.metadata["lon"].to_numpy(np.float64)
        self.sizes = self.metadata[["width", "height"]].to_numpy(np.int64)  # per image, for verification
        self._norm_ref: float | None = None
        self.faiss_index, self.device = (cpu_index, "cpu") if device == "cpu" else to_device(cpu_index)

    def __len__(self) -> int:
        return self.manifest.num_images

    def local_features(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (K, 2) float32 and descriptors (K, D) float32 of indexed image ``i``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.keypoints[a:b], np.float32), np.asarray(self.descriptors[a:b], np.float32)

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

    def check_model(self, model_id: str, fingerprint: str) -> None:
        m = self.manifest
        if model_id != m.model_id or fingerprint != m.model_fingerprint:
            raise IndexFormatError(
                f"{self.path} was built with model {m.model_id!r} (fingerprint {m.model_fingerprint[:12]}), "
                f"but the query uses {model_id!r} (fingerprint {fingerprint[:12]}); query with "
                f"--model {m.model_id} and the same settings, or rebuild the index with this model"
            )

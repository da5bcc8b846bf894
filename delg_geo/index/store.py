"""The compact local-feature store: codecs for local descriptors and keypoints, and its reader.

A local descriptor of any dimension D (112 for ``efficientnet-lite0``, 128 for the official
DELG, or another extractor's) is stored as a short code:

* ``float16``   — the descriptor as it is (2·D bytes),
* ``pca-int8``  — centred, projected on the top ``dim`` principal components of a sample of the
  collection, L2-normalised, then one signed byte per component with a per-component scale
  (``dim`` bytes),
* ``pca-binary``— the signs of the same projection, packed (``dim``/8 bytes); matched as ±1 vectors,
  so the cosine is 1 − 2·Hamming/dim,
* ``pq``        — FAISS product quantisation of the PCA projection (``m`` bytes).

The query's own descriptors are only projected (``LocalCodec.project``), never quantised; the
candidates' codes are decoded (``decode``) into the same space, so matching is asymmetric.

Keypoints are stored as ``uint16`` pixels (rounded; a 12 px RANSAC threshold makes the 0.5 px
rounding irrelevant), in units of ``keypoint_unit(width, height)`` pixels so that images wider
than 65535 px still fit.

Files (plain ``.npy`` / ``.npz``; a query reads only its candidates' records, with ``pread``, and
needs no RAM in proportion to the store)::

    local_offsets.npy    (N + 1,) int64: image i owns rows offsets[i]:offsets[i+1]
    local_keypoints.npy  (M, 2) uint16
    local_codes.npy      (M, C) uint8 / int8 / float16
    local_codec.npz      the codec: kind, PCA mean and projection, scales, PQ centroids
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.features.base import l2_normalize
from delg_geo.index.rowfile import NpyRows

LOCAL_CODECS = ("float16", "pca-int8", "pca-binary", "pq")


def keypoint_unit(width, height) -> np.ndarray:
    """Pixels per stored keypoint unit: 1 unless the image is wider or taller than 65535 px."""
    side = np.maximum(np.asarray(width, np.int64), np.asarray(height, np.int64))
    return np.maximum(1, -(-(side + 1) // 65536)).astype(np.int64)


def encode_keypoints(kp: np.ndarray, unit: int) -> np.ndarray:
    return np.clip(np.rint(np.asarray(kp, np.float64) / unit), 0, 65535).astype(np.uint16)


def decode_keypoints(codes: np.ndarray, unit: int) -> np.ndarray:
    return np.asarray(codes, np.float32) * np.float32(unit)


@dataclass
class LocalCodec:
    kind: str
    in_dim: int
    dim: int  # dimension of the matching space (after PCA)
    mean: np.ndarray | None = None  # (in_dim,)
    projection: np.ndarray | None = None  # (in_dim, dim), orthonormal columns
    scales: np.ndarray | None = None  # (dim,) int8: code = round(x * scale)
    centroids: np.ndarray | None = None  # (m, 256, dim // m) PQ

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def code_width(self) -> int:
        return {"float16": self.dim, "pca-int8": self.dim, "pca-binary": (self.dim + 7) // 8,
                "pq": 0 if self.centroids is None else int(self.centroids.shape[0])}[self.kind]

    @property
    def code_dtype(self):
        return {"float16": np.float16, "pca-int8": np.int8, "pca-binary": np.uint8, "pq": np.uint8}[self.kind]

    @property
    def bytes_per_feature(self) -> int:
        return self.code_width * np.dtype(self.code_dtype).itemsize

    # -- coding --------------------------------------------------------------------------------
    def project(self, x: np.ndarray) -> np.ndarray:
        """Descriptors (N, in_dim) -> L2-normalised float32 (N, dim) in the matching space."""
        x = np.asarray(x, np.float32).reshape(-1, self.in_dim)
        if self.projection is not None:
            x = (x - self.mean) @ self.projection
        return l2_normalize(x, axis=1)

    def encode_projected(self, y: np.ndarray) -> np.ndarray:
        """Codes of already projected, L2-normalised vectors (N, dim)."""
        y = np.asarray(y, np.float32).reshape(-1, self.dim)
        if self.kind == "float16":
            return y.astype(np.float16)
        if self.kind == "pca-int8":
            return np.clip(np.rint(y * self.scales), -127, 127).astype(np.int8)
        if self.kind == "pca-binary":
            return np.packbits(y > 0, axis=1)
        if self.kind == "pq":
            return self._pq().compute_codes(np.ascontiguousarray(y))
        raise ValueError(self.kind)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.encode_projected(self.project(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, code_width) -> L2-normalised float32 (N, dim)."""
        c = np.asarray(codes)
        if self.kind == "float16":
            y = c.astype(np.float32)
        elif self.kind == "pca-int8":
            y = c.astype(np.float32) / self.scales
        elif self.kind == "pca-binary":
            y = np.unpackbits(c.astype(np.uint8), axis=1, count=self.dim).astype(np.float32) * 2.0 - 1.0
        elif self.kind == "pq":
            y = self._pq().decode(np.ascontiguousarray(c, np.uint8)) if len(c) else np.zeros((0, self.dim), np.float32)
        else:
            raise ValueError(self.kind)
        return l2_normalize(y.reshape(-1, self.dim), axis=1)

    def _pq(self):
        pq = getattr(self, "_pq_cache", None)
        if pq is None:
            import faiss

            m, ksub, dsub = self.centroids.shape
            pq = faiss.ProductQuantizer(self.dim, m, int(np.log2(ksub)))
            faiss.copy_array_to_vector(np.ascontiguousarray(self.centroids, np.float32).ravel(), pq.centroids)
            self._pq_cache = pq
        return pq

    # -- storage -------------------------------------------------------------------------------
    def info(self) -> dict:
        out = dict(kind=self.kind, in_dim=self.in_dim, dim=self.dim, bytes_per_feature=self.bytes_per_feature)
        if self.kind == "pq":
            out["pq_m"] = int(self.centroids.shape[0])
        return out

    def save(self, path: str | Path) -> None:
        arrays = dict(kind=np.asarray(self.kind), in_dim=np.asarray(self.in_dim), dim=np.asarray(self.dim))
        for k in ("mean", "projection", "scales", "centroids"):
            v = getattr(self, k)
            if v is not None:
                arrays[k] = np.asarray(v, np.float32)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "LocalCodec":
        with np.load(path, allow_pickle=False) as z:
            get = lambda k: z[k] if k in z.files else None  # noqa: E731
            return cls(kind=str(z["kind"]), in_dim=int(z["in_dim"]), dim=int(z["dim"]), mean=get("mean"),
                       projection=get("projection"), scales=get("scales"), centroids=get("centroids"))


def fit_local_codec(sample: np.ndarray, kind: str = "pca-int8", dim: int | None = None, pq_m: int | None = None,
                    seed: int = 0) -> LocalCodec:
    """Fit a codec on a sample (n, D) of the collection's L2-normalised local descriptors."""
    if kind not in LOCAL_CODECS:
        raise ValueError(f"unknown local codec {kind!r}: use one of {', '.join(LOCAL_CODECS)}")
    x = np.asarray(sample, np.float32)
    in_dim = int(x.shape[1])
    if kind == "float16":
        return LocalCodec("float16", in_dim, in_dim)
    dim = int(min(dim or in_dim, in_dim))
    if kind == "pca-binary":
        dim = max(8, dim - dim % 8)
    mean = x.mean(axis=0)
    xc = (x - mean).astype(np.float64)
    evals, evecs = np.linalg.eigh(xc.T @ xc / max(1, len(x) - 1))
    proj = evecs[:, np.argsort(evals)[::-1][:dim]].astype(np.float32)
    codec = LocalCodec(kind, in_dim, dim, mean=mean.astype(np.float32), projection=proj)
    y = codec.project(x)
    if kind == "pca-int8":
        # 127 at the 99.9th percentile of each component: a few outliers clip, the rest keep resolution
        codec.scales = (127.0 / np.maximum(np.quantile(np.abs(y), 0.999, axis=0), 1e-6)).astype(np.float32)
    elif kind == "pq":
        import faiss

        m = int(pq_m or max(1, dim // 4))
        if dim % m:
            raise ValueError(f"PQ with {m} sub-quantisers needs a dimension divisible by {m} (got {dim})")
        pq = faiss.ProductQuantizer(dim, m, 8)
        pq.cp.seed = seed
        pq.train(np.ascontiguousarray(y))
        codec.centroids = faiss.vector_to_array(pq.centroids).reshape(m, 256, dim // m)
    return codec


class LocalStore:
    """Read side of the compact store (format 2): memory-mapped, decodes one image at a time."""

    def __init__(self, index_dir: Path, widths: np.ndarray, heights: np.ndarray):
        self.codec = LocalCodec.load(index_dir / "local_codec.npz")
        self.offsets = np.load(index_dir / "local_offsets.npy")
        # memory maps for whole-store work (checks, tools); a query's candidates are read with
        # pread (delg_geo.index.rowfile), so its resident memory does not grow with the store
        self.keypoints = np.load(index_dir / "local_keypoints.npy", mmap_mode="r")
        self.codes = np.load(index_dir / "local_codes.npy", mmap_mode="r")
        self._kp_rows = NpyRows(index_dir / "local_keypoints.npy")
        self._code_rows = NpyRows(index_dir / "local_codes.npy")
        self.units = keypoint_unit(widths, heights)

    def query(self, descriptors: np.ndarray) -> np.ndarray:
        return self.codec.project(descriptors)

    def features(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return (decode_keypoints(self._kp_rows.rows(a, b), int(self.units[i])),
                self.codec.decode(self._code_rows.rows(a, b)))


class LegacyLocalStore:
    """Format 1 (float32 keypoints, float16 descriptors at the model's dimension): read as it is."""

    def __init__(self, index_dir: Path):
        self.offsets = np.load(index_dir / "local_offsets.npy")
        self.keypoints = np.load(index_dir / "local_keypoints.npy", mmap_mode="r")
        self.codes = np.load(index_dir / "local_descriptors.npy", mmap_mode="r")
        self.codec = LocalCodec("float16", int(self.codes.shape[1]), int(self.codes.shape[1]))

    def query(self, descriptors: np.ndarray) -> np.ndarray:
        return np.asarray(descriptors, np.float32)

    def features(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.keypoints[a:b], np.float32), np.asarray(self.codes[a:b], np.float32)

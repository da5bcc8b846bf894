"""SIFT-matching baseline, as in the EPFL "Paintings / Photos geolocalisation" project (Venice).

Each image is downsized so its longest side is at most ``max_side`` (640 px), OpenCV SIFT keeps
the ``max_features`` (2000) strongest keypoints, and the descriptors are turned into RootSIFT
(L1-normalised, square-rooted, hence of unit L2 norm, so a dot product is a Hellinger kernel).
Keypoints are returned in original-image pixels.

A query is compared with every reference (or a shortlist): mutual nearest neighbours passing
Lowe's ratio test (0.8) are fitted with a pydegensac homography, and the inliers counted. The
fit runs in a frame where each image's longest side is ``ref_side`` px (640), so the ~4 px
threshold means the same thing whatever the original resolution. Note that pydegensac reseeds its
random generator from the clock (``time()``, whole seconds) on every call, so an inlier count can
differ by a few between runs; the features themselves are deterministic.

:class:`SiftIndex` extracts the references with a thread pool (OpenCV releases the GIL) and
caches each image's features as a plain ``.npz`` file, keyed by a hash of the path, the file's
size and modification time, and the settings, so a second benchmark run skips extraction.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError, ImageLoadError
from delg_geo.features.images import LoadedImage, load_image

#: Bump when extraction changes, so old cache files are ignored.
CACHE_VERSION = 1


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - depends on the environment
        raise DelgGeoError(
            "the SIFT baseline needs OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


@dataclass
class SiftFeatures:
    """RootSIFT features of one image; keypoints (x, y) in original-image pixels."""

    keypoints: np.ndarray  # (K, 2) float32
    descriptors: np.ndarray  # (K, 128) float32, RootSIFT (unit L2 norm)
    image_size: tuple[int, int]  # (width, height) of the original image, after EXIF orientation

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, image_size: tuple[int, int] = (0, 0)) -> SiftFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), image_size)


def root_sift(descriptors: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """RootSIFT: L1-normalise each SIFT descriptor and take the square root (unit L2 norm)."""
    d = np.asarray(descriptors, np.float32)
    if d.size == 0:
        return np.zeros((0, 128), np.float32)
    d = np.maximum(d, 0.0)
    d = d / (d.sum(axis=1, keepdims=True) + eps)
    return np.sqrt(d).astype(np.float32)


def extract_sift(
    image: str | Path | LoadedImage, max_features: int = 2000, max_side: int = 640
) -> SiftFeatures:
    """SIFT keypoints and RootSIFT descriptors of ``image`` (a path or a :class:`LoadedImage`).

    The image is processed with its longest side at most ``max_side`` px; at most
    ``max_features`` keypoints are kept, strongest first. Raises :class:`ImageLoadError` for an
    unreadable image.
    """
    cv2 = _cv2()
    if max_features < 1:
        raise ValueError(f"max_features must be at least 1, got {max_features}")
    img = image if isinstance(image, LoadedImage) else load_image(image, max_side=max_side)
    arr = img.array
    h, w = arr.shape[:2]
    if max_side and max(h, w) > max_side:
        f = max_side / float(max(h, w))
        arr = cv2.resize(
            arr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
        )
    ow, oh = img.original_size
    # Per-axis scale (array px / original px), exact even after rounding of the sizes.
    sx, sy = arr.shape[1] / float(ow), arr.shape[0] / float(oh)
    gray = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=int(max_features))
    kps, desc = sift.detectAndCompute(gray, None)
    if desc is None or not kps:
        return SiftFeatures.empty((int(ow), int(oh)))
    # OpenCV may return a few more than nfeatures (one keypoint with several orientations).
    order = np.argsort([-k.response for k in kps], kind="stable")[:max_features]
    pts = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
    # pixel centres: array coordinate c covers original [c/s, (c+1)/s)
    pts[:, 0] = (pts[:, 0] + 0.5) / sx - 0.5
    pts[:, 1] = (pts[:, 1] + 0.5) / sy - 0.5
    return SiftFeatures(pts, root_sift(desc[order]), (int(ow), int(oh)))


@dataclass(frozen=True)
class SiftMatchConfig:
    ratio: float = 0.8  # Lowe ratio on descriptor distances
    px_threshold: float = 4.0  # homography reprojection threshold, in px of a ref_side image
    ref_side: float = 640.0
    confidence: float = 0.999
    max_iters: int = 2000
    min_matches: int = 5  # fewer tentative matches than this: 0 inliers, no fit


def mutual_ratio_matches(qd: np.ndarray, rd: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """(K, 2) index pairs of mutual nearest neighbours passing Lowe's ratio test.

    Same pairs as :func:`delg_geo.retrieval.verify.mutual_matches` (unit vectors, ratio on the distances
    ``sqrt(2 - 2 cos)``) up to exact ties, about four times faster: whether a match is mutual is
    read from the column maxima, and the second neighbour from a row maximum after masking the
    first, instead of a column argmax and a partition of the whole similarity matrix.
    """
    if len(qd) == 0 or len(rd) == 0:
        return np.zeros((0, 2), np.int64)
    sim = np.asarray(qd, np.float32) @ np.asarray(rd, np.float32).T
    idx = np.arange(len(qd))
    nn12 = sim.argmax(axis=1)
    best = sim[idx, nn12]
    keep = best >= sim.max(axis=0)[nn12]
    if ratio < 1.0 and sim.shape[1] > 1:
        sim[idx, nn12] = -np.inf
        second = sim.max(axis=1)
        d1 = np.sqrt(np.maximum(2 - 2 * best, 0))
        d2 = np.sqrt(np.maximum(2 - 2 * second, 1e-12))
        keep &= d1 <= ratio * d2
    return np.stack([idx[keep], nn12[keep]], axis=1)


def _fit_frame(kp: np.ndarray, size: tuple[int, int], ref_side: float) -> np.ndarray:
    side = max(size) if size and max(size) > 0 else ref_side
    return np.ascontiguousarray(kp, np.float64) * (ref_side / float(side))


def count_inliers(
    q_kp: np.ndarray,
    q_desc: np.ndarray,
    q_size: tuple[int, int],
    r_kp: np.ndarray,
    r_desc: np.ndarray,
    r_size: tuple[int, int],
    cfg: SiftMatchConfig = SiftMatchConfig(),
) -> int:
    """Inliers of a pydegensac homography fitted to the mutual, ratio-tested SIFT matches."""
    import pydegensac

    if len(q_desc) == 0 or len(r_desc) == 0:
        return 0
    pairs = mutual_ratio_matches(q_desc, r_desc, cfg.ratio)
    if len(pairs) < max(cfg.min_matches, 4):
        return 0
    # Each image rescaled to a longest side of ref_side: a similarity per image, which a
    # homography absorbs, so only the threshold's meaning changes.
    src = _fit_frame(q_kp[pairs[:, 0]], q_size, cfg.ref_side)
    dst = _fit_frame(r_kp[pairs[:, 1]], r_size, cfg.ref_side)
    _, mask = pydegensac.findHomography(
        src, dst, cfg.px_threshold, cfg.confidence, cfg.max_iters
    )
    return 0 if mask is None else int(np.count_nonzero(mask))


def match_pair(q: SiftFeatures, r: SiftFeatures, cfg: SiftMatchConfig = SiftMatchConfig()) -> int:
    """Inlier count between two images' features."""
    return count_inliers(
        q.keypoints, q.descriptors, q.image_size, r.keypoints, r.descriptors, r.image_size, cfg
    )


# --------------------------------------------------------------------------------------------
# cache


def _cache_key(path: Path, max_features: int, max_side: int) -> str:
    st = path.stat()
    ident = f"v{CACHE_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}|n{max_features}|s{max_side}"
    return hashlib.sha1(ident.encode("utf-8", "surrogateescape")).hexdigest()


def _save_npz(dest: Path, feats: SiftFeatures, source: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                keypoints=feats.keypoints.astype(np.float32),
                descriptors=feats.descriptors.astype(np.float16),
                image_size=np.asarray(feats.image_size, np.int64),
                version=np.asarray(CACHE_VERSION, np.int64),
                source=np.asarray(source),
            )
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """(keypoints, float16 descriptors, size) from a cache file; None if absent or unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION:
                return None
            kp = np.asarray(z["keypoints"], np.float32)
            desc = np.asarray(z["descriptors"], np.float16)
            size = tuple(int(v) for v in z["image_size"])
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if kp.ndim != 2 or kp.shape[1] != 2 or desc.shape != (len(kp), 128) or len(size) != 2:
        return None
    return kp, desc, size  # type: ignore[return-value]


@dataclass
class MatchStats:
    """Time spent in :meth:`SiftIndex.match` (matching + homography fit)."""

    pairs: int = 0
    seconds: float = 0.0

    @property
    def ms_per_pair(self) -> float:
        return 1000.0 * self.seconds / self.pairs if self.pairs else 0.0


class SiftIndex:
    """SIFT features of a list of reference images, for brute-force or shortlist matching.

    ``cache_dir`` (optional) holds one ``.npz`` per reference; files found there are loaded
    instead of re-extracted. References that cannot be read are listed in ``failed``
    (``(index, path, reason)``) and match with 0 inliers.

    Descriptors are held (and cached) as float16 to halve memory: about 0.5 MB per image at
    2000 keypoints.
    """

    def __init__(
        self,
        paths,
        cache_dir: str | Path | None = None,
        max_features: int = 2000,
        max_side: int = 640,
        match_config: SiftMatchConfig | None = None,
        workers: int | None = None,
        progress: bool = False,
    ):
        self.paths = [Path(p) for p in paths]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_features = int(max_features)
        self.max_side = int(max_side)
        self.config = match_config or SiftMatchConfig(ref_side=float(max_side or 640))
        self.stats = MatchStats()
        self.failed: list[tuple[int, str, str]] = []
        self.n_extracted = 0
        self.n_from_cache = 0
        n = len(self.paths)
        self._kp: list[np.ndarray] = [np.zeros((0, 2), np.float32)] * n
        self._desc: list[np.ndarray] = [np.zeros((0, 128), np.float16)] * n
        self._size: list[tuple[int, int]] = [(0, 0)] * n
        self.extract_seconds = 0.0
        t0 = time.perf_counter()
        self._build(workers, progress)
        self.extract_seconds = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.paths)

    def _cache_file(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        key = _cache_key(path, self.max_features, self.max_side)
        return self.cache_dir / key[:2] / f"{key}.npz"

    def _one(self, i: int) -> tuple[int, str | None, bool]:
        """Fill reference ``i``; (i, error reason or None, loaded from cache)."""
        path = self.paths[i]
        resolved = path.resolve()
        try:
            cache = self._cache_file(resolved)
        except OSError:  # missing or unreadable: the loader below says why
            cache = None
        if cache is not None:
            hit = _load_npz(cache)
            if hit is not None:
                self._kp[i], self._desc[i], self._size[i] = hit
                return i, None, True
        try:
            f = extract_sift(resolved, self.max_features, self.max_side)
        except ImageLoadError as exc:
            return i, exc.reason, False
        self._kp[i] = f.keypoints
        self._desc[i] = f.descriptors.astype(np.float16)
        self._size[i] = f.image_size
        if cache is not None:
            try:
                _save_npz(cache, f, str(resolved))
            except OSError as exc:  # a read-only or full cache folder must not stop the run
                warnings.warn(f"SIFT cache not written ({cache}): {exc}", stacklevel=2)
        return i, None, False

    def _build(self, workers: int | None, progress: bool) -> None:
        from tqdm.auto import tqdm

        workers = workers or min(8, (os.cpu_count() or 1))
        bar = tqdm(total=len(self.paths), desc="SIFT references", unit="img", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                futures = [pool.submit(self._one, i) for i in range(len(self.paths))]
                for fut in as_completed(futures):
                    i, err, cached = fut.result()
                    if err is not None:
                        self.failed.append((i, str(self.paths[i]), err))
                    elif cached:
                        self.n_from_cache += 1
                    else:
                        self.n_extracted += 1
                    bar.update(1)
        finally:
            bar.close()
        self.failed.sort()

    def features(self, i: int) -> SiftFeatures:
        """Features of reference ``i`` (descriptors as float32)."""
        return SiftFeatures(self._kp[i], self._desc[i].astype(np.float32), self._size[i])

    def match(self, query: SiftFeatures, candidate_ids: list[int] | None = None) -> np.ndarray:
        """Inliers of ``query`` against each candidate reference (all of them when None).

        Returns an int64 array aligned with ``candidate_ids`` (or with ``paths``).
        """
        ids = range(len(self.paths)) if candidate_ids is None else candidate_ids
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < len(self.paths):
                raise IndexError(f"candidate id {i} out of range (index has {len(self.paths)})")
        out = np.zeros(len(ids), np.int64)
        q_desc = np.asarray(query.descriptors, np.float32)
        t0 = time.perf_counter()
        for j, i in enumerate(ids):
            out[j] = count_inliers(
                query.keypoints,
                q_desc,
                query.image_size,
                self._kp[i],
                self._desc[i].astype(np.float32),
                self._size[i],
                self.config,
            )
        self.stats.seconds += time.perf_counter() - t0
        self.stats.pairs += len(ids)
        return out

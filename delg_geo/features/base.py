"""The one feature record every extractor returns, and its plain-file storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Features:
    """DELG-style features of one image.

    ``keypoints`` are (x, y) pixel coordinates in the original image (after EXIF orientation).
    ``global_descriptor`` and every row of ``local_descriptors`` are L2-normalised float32.
    """

    global_descriptor: np.ndarray  # (G,) float32
    keypoints: np.ndarray  # (N, 2) float32, x then y
    local_descriptors: np.ndarray  # (N, D) float32, D <= 128
    scores: np.ndarray  # (N,) float32 attention
    image_size: tuple[int, int]  # (width, height) of the original image
    model_id: str
    # (N,) per feature: the pyramid scale for efficientnet-lite0; the model's own ``scales``
    # output (as the official DELG code reports it) for the official SavedModels.
    scales: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    @property
    def num_local(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def global_dim(self) -> int:
        return int(self.global_descriptor.shape[0])

    @property
    def local_dim(self) -> int:
        return int(self.local_descriptors.shape[1]) if self.local_descriptors.ndim == 2 else 0

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (plain arrays, no pickles)."""
        np.savez(
            path,
            global_descriptor=self.global_descriptor,
            keypoints=self.keypoints,
            local_descriptors=self.local_descriptors,
            scores=self.scores,
            scales=self.scales,
            image_size=np.asarray(self.image_size, np.int64),
            model_id=np.asarray(self.model_id),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                global_descriptor=z["global_descriptor"],
                keypoints=z["keypoints"],
                local_descriptors=z["local_descriptors"],
                scores=z["scores"],
                scales=z["scales"],
                image_size=tuple(int(v) for v in z["image_size"]),
                model_id=str(z["model_id"]),
            )


def features_problem(f: Features) -> str | None:
    """Why ``f`` cannot be used (no local features, an empty or non-finite global descriptor,
    non-finite local features), or None when it can."""
    g = np.asarray(f.global_descriptor)
    if g.size == 0 or not np.all(np.isfinite(g)) or not np.any(g):
        return "no global descriptor could be computed (blank image, or too small to describe)"
    if f.num_local == 0:
        return "no local features could be computed (blank image, or too small to describe)"
    if not (np.all(np.isfinite(f.keypoints)) and np.all(np.isfinite(f.local_descriptors))):
        return "the model gave non-finite local features"
    return None


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32)

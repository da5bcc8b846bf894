"""PCA whitening of global descriptors, fitted on the collection being indexed.

Stored with the index as a plain ``.npz`` (mean, projection, settings); never shipped with a
model. ``apply`` centres, projects onto the top components, scales each by eigenvalue^-power,
and L2-normalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.features.base import l2_normalize


@dataclass
class Whitening:
    mean: np.ndarray  # (D,)
    projection: np.ndarray | None  # (D, K): columns are scaled principal directions; None = identity

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return self.in_dim if self.projection is None else int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, np.float32))
        if self.projection is None:
            return l2_normalize(x - self.mean, axis=1)
        return l2_normalize((x - self.mean) @ self.projection, axis=1)

    def save(self, path: str | Path) -> None:
        arrays = {"mean": self.mean.astype(np.float32)}
        if self.projection is not None:  # an identity is not written out as a D x D matrix
            arrays["projection"] = self.projection.astype(np.float32)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        with np.load(path, allow_pickle=False) as z:
            return cls(mean=z["mean"], projection=z["projection"] if "projection" in z.files else None)

    @classmethod
    def identity(cls, dim: int) -> "Whitening":
        return cls(mean=np.zeros(dim, np.float32), projection=None)


def fit_pca_whitening(
    x: np.ndarray, dim: int | None = None, power: float = 0.5, shrinkage: float = 0.0
) -> Whitening:
    """Fit on (N, D) L2-normalised descriptors.

    ``dim`` keeps that many components (default: all that the data supports, ``min(D, N - 1)``).
    ``power`` 0.5 is full whitening, 0 is plain PCA; ``shrinkage`` adds that fraction of the mean
    eigenvalue before the power, which damps noisy trailing components on small collections.
    """
    x = np.asarray(x, np.float64)
    n, d = x.shape
    if n < 2:
        return Whitening.identity(d)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(1, n - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    k = min(dim or d, d, n - 1)
    evals, evecs = np.maximum(evals[:k], 1e-12), evecs[:, :k]
    reg = evals + shrinkage * evals.mean()
    proj = evecs / np.power(reg, power)[None, :]
    return Whitening(mean=mean.astype(np.float32), projection=proj.astype(np.float32))

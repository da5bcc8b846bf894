"""Monotone maps from evidence to a probability: a sign-constrained logistic regression and an
isotonic regression (pool-adjacent-violators), both plain numbers that fit in a JSON file.

* :func:`fit_logistic` fits ``p = sigmoid(b + w . x)`` by L2-penalised maximum likelihood with
  each weight's sign fixed in advance (``+1``: more of this evidence never lowers ``p``; ``-1``:
  never raises it; ``0``: free), so the fitted map is monotone in every feature that has a sign.
* :func:`fit_isotonic` fits the non-decreasing step function that minimises the squared error
  (the PAV algorithm), read with linear interpolation between block centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LogisticMap:
    weights: np.ndarray  # (F,)
    intercept: float
    mean: np.ndarray  # (F,) feature standardisation, applied before the weights
    scale: np.ndarray  # (F,)

    def logit(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, np.float64))
        return self.intercept + ((x - self.mean) / self.scale) @ self.weights

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(x)))

    def to_dict(self) -> dict:
        return dict(weights=self.weights.tolist(), intercept=float(self.intercept),
                    mean=self.mean.tolist(), scale=self.scale.tolist())

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticMap":
        return cls(np.asarray(d["weights"], np.float64), float(d["intercept"]),
                   np.asarray(d["mean"], np.float64), np.asarray(d["scale"], np.float64))


def fit_logistic(x, y, signs=None, l2: float = 1.0) -> LogisticMap:
    """Sign-constrained, L2-penalised logistic regression of ``y`` (0/1) on the rows of ``x``.

    Features are standardised first (so ``l2`` treats them alike); the intercept is not penalised.
    """
    from scipy.optimize import minimize

    x = np.atleast_2d(np.asarray(x, np.float64))
    y = np.asarray(y, np.float64).ravel()
    n, f = x.shape
    if n != len(y):
        raise ValueError(f"{n} rows of evidence but {len(y)} labels")
    signs = np.zeros(f) if signs is None else np.asarray(signs, np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale

    def loss(theta):
        b, w = theta[0], theta[1:]
        t = b + z @ w
        # log(1 + e^t) - y t, computed stably
        nll = np.sum(np.logaddexp(0.0, t) - y * t)
        p = 1.0 / (1.0 + np.exp(-t))
        g = np.concatenate([[np.sum(p - y)], z.T @ (p - y) + l2 * w])
        return nll + 0.5 * l2 * float(w @ w), g

    bounds = [(None, None)] + [(0, None) if s > 0 else (None, 0) if s < 0 else (None, None) for s in signs]
    prior = np.clip(y.mean(), 1e-3, 1 - 1e-3)
    theta0 = np.concatenate([[np.log(prior / (1 - prior))], np.zeros(f)])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds)
    return LogisticMap(res.x[1:].copy(), float(res.x[0]), mean, scale)


@dataclass
class IsotonicMap:
    """A non-decreasing map, linear between the points ``(x, y)`` and flat beyond them."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, v) -> np.ndarray:
        return np.interp(np.asarray(v, np.float64), self.x, self.y)

    def to_dict(self) -> dict:
        return dict(x=[round(float(v), 6) for v in self.x], y=[round(float(v), 6) for v in self.y])

    @classmethod
    def from_dict(cls, d: dict) -> "IsotonicMap":
        return cls(np.asarray(d["x"], np.float64), np.asarray(d["y"], np.float64))


def fit_isotonic(x, y, weights=None, min_block: int = 1) -> IsotonicMap:
    """Pool-adjacent-violators: the non-decreasing fit of ``y`` against ``x``.

    Each block is represented by its weighted mean ``x`` and mean ``y``; blocks holding fewer than
    ``min_block`` samples are pooled with a neighbour, which keeps a small sample from producing
    0 % and 100 % steps.
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64).ravel()
    if not (len(x) == len(y) == len(w)) or len(x) == 0:
        raise ValueError("x, y and weights must be non-empty and of the same length")
    # equal x values form one block from the start: [sum w, sum w*y, sum w*x, count]
    ux, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sw = np.bincount(inv, w)
    swy = np.bincount(inv, w * y)
    blocks: list[list[float]] = []
    for xi, wi, wyi, ci in zip(ux, sw, swy, counts):
        blocks.append([wi, wyi, wi * xi, int(ci)])
        while len(blocks) > 1 and (
            blocks[-2][1] / blocks[-2][0] >= blocks[-1][1] / blocks[-1][0] or blocks[-2][3] < min_block
        ):
            b = blocks.pop()
            for k in range(4):
                blocks[-1][k] += b[k]
    while len(blocks) > 1 and blocks[-1][3] < min_block:  # a short last block joins its neighbour
        b = blocks.pop()
        for k in range(4):
            blocks[-1][k] += b[k]
    bx = np.array([b[2] / b[0] for b in blocks])
    by = np.array([b[1] / b[0] for b in blocks])
    by = np.maximum.accumulate(by)  # pooling a short last block can leave a tiny dip
    return IsotonicMap(bx, by)

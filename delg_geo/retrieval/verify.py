"""Stage 4 — verify: local-descriptor matching and geometric verification with pydegensac.

The defaults (a homography, 500 features per image, 15 inliers) and how they were chosen:
docs/notes/history.md.

Matching keeps mutual nearest neighbours whose cosine similarity passes ``min_similarity`` and
whose first/second-neighbour ratio (in descriptor distance) passes ``ratio``. The matches are
then fitted with pydegensac (a homography by default, or a fundamental matrix) and the inliers
counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class VerifyConfig:
    model: str = "homography"  # or "fundamental"
    px_threshold: float = 12.0  # reprojection / Sampson threshold in *original-image* pixels (scaled by size)
    ref_side: float = 500.0  # px_threshold applies to an image whose longest side is this
    confidence: float = 0.999
    max_iters: int = 2000
    ratio: float = 0.95  # Lowe ratio on descriptor distances; 1.0 disables
    min_similarity: float = 0.0  # cosine threshold on a mutual match
    min_inliers: int = 15  # a candidate with fewer inliers is not "verified"
    max_features: int = 500  # use at most this many (highest-attention) features per image

    def to_dict(self) -> dict:
        return asdict(self)


#: Verification settings per local-feature type (``index build --local``). ``delg``: as above.
#: The learned types match with ratio 0.9 and a tighter homography threshold. ``aliked-n16`` (the
#: default) matches the query's best 500 keypoints, as many as the compact store keeps per image:
#: the self-queries that fit the vote's settings (``delg_geo.retrieval.calibrate``, stored features
#: on both sides) then see the inlier counts a query sees. The vote's settings (min inliers, base
#: inliers, radius) are fitted per index by ``delg_geo.retrieval.calibrate`` where the index is
#: calibrated. How these were chosen: docs/notes/history.md.
VERIFY_DEFAULTS: dict[str, VerifyConfig] = {
    "delg": VerifyConfig(),
    "xfeat": VerifyConfig(px_threshold=4.0, ratio=0.9, max_features=1024, min_inliers=15),
    "aliked-n16": VerifyConfig(px_threshold=4.0, ratio=0.9, max_features=500, min_inliers=15),
}


@dataclass
class Verification:
    inliers: int
    matches: int
    inlier_pairs: np.ndarray  # (K, 2) int: query feature index, candidate feature index


def mutual_matches(
    qd: np.ndarray, cd: np.ndarray, ratio: float = 0.95, min_similarity: float = 0.0
) -> np.ndarray:
    """(K, 2) index pairs of mutual nearest neighbours between two L2-normalised sets."""
    if len(qd) == 0 or len(cd) == 0:
        return np.zeros((0, 2), np.int64)
    sim = qd @ cd.T  # cosine similarity
    nn12 = np.argmax(sim, axis=1)
    nn21 = np.argmax(sim, axis=0)
    idx = np.arange(len(qd))
    keep = nn21[nn12] == idx
    best = sim[idx, nn12]
    if min_similarity > 0:
        keep &= best >= min_similarity
    if ratio < 1.0 and sim.shape[1] > 1:
        rows = np.flatnonzero(keep)  # the second neighbour only where it can matter
        second = -np.partition(-sim[rows], 1, axis=1)[:, 1]
        # distances of unit vectors: d = sqrt(2 - 2 s)
        d1 = np.sqrt(np.maximum(2 - 2 * best[rows], 0))
        d2 = np.sqrt(np.maximum(2 - 2 * second, 1e-12))
        keep[rows] = d1 <= ratio * d2
    return np.stack([idx[keep], nn12[keep]], axis=1)


def verify_pair(
    q_kp: np.ndarray,
    q_desc: np.ndarray,
    c_kp: np.ndarray,
    c_desc: np.ndarray,
    cfg: VerifyConfig = VerifyConfig(),
    q_size: tuple[int, int] | None = None,
    c_size: tuple[int, int] | None = None,
    seed: int | None = None,
) -> Verification:
    """Match two feature sets and count the inliers of a pydegensac fit. ``seed`` fixes
    RANSAC's random draws (the same pair then gets the same count, in any order or thread)."""
    import pydegensac

    pairs = mutual_matches(
        np.asarray(q_desc[: cfg.max_features], np.float32),
        np.asarray(c_desc[: cfg.max_features], np.float32),
        cfg.ratio,
        cfg.min_similarity,
    )
    n = len(pairs)
    need = 4 if cfg.model == "homography" else 8
    if n < max(need, 5):
        return Verification(0, n, np.zeros((0, 2), np.int64))
    src = np.ascontiguousarray(q_kp[pairs[:, 0]], dtype=np.float64)
    dst = np.ascontiguousarray(c_kp[pairs[:, 1]], dtype=np.float64)
    # Thresholds are given for a reference image size; scale them to these images.
    sides = [max(s) for s in (q_size, c_size) if s]
    th = cfg.px_threshold * (max(sides) / cfg.ref_side if sides else 1.0)
    if cfg.model == "homography":
        _, mask = pydegensac.findHomography(src, dst, th, cfg.confidence, cfg.max_iters,
                                            **({} if seed is None else {"seed": int(seed)}))
    elif cfg.model == "fundamental":
        _, mask = pydegensac.findFundamentalMatrix(
            src, dst, th, cfg.confidence, cfg.max_iters, enable_degeneracy_check=True,
            **({} if seed is None else {"seed": int(seed)})
        )
    else:
        raise ValueError(f"unknown verification model {cfg.model!r}")
    mask = np.asarray(mask, bool).ravel() if mask is not None else np.zeros(n, bool)
    return Verification(int(mask.sum()), n, pairs[mask])

"""Kernel-density vote over the coordinates of retrieved neighbours ([L]kNN).

Vo, Jacobs & Hays (2017), "Revisiting IM2GPS in the deep learning era": rather than trusting the
single nearest neighbour, place a Gaussian kernel on each of the top-k neighbours' positions and
predict the neighbour position where the similarity-weighted density is highest. A cluster of
moderately similar photos taken at one place then beats a lone, very similar photo elsewhere.

Score of neighbour ``i``: ``s_i = sum_j w_j exp(-d(i, j)^2 / (2 sigma^2))`` with ``d`` the
great-circle distance and ``w_j = max(sim_j, 0) ** power``. The reported score is ``s_i / sum_j w_j``,
the share of the vote supporting the chosen place (1 when all neighbours agree).
"""

from __future__ import annotations

import numpy as np

from delg_geo.core.geo import haversine_km, latlon_to_unit

__all__ = ["knn_vote", "vote_scales", "fine_scale", "default_sigma_km"]

def _weighted_mean_latlon(lats: np.ndarray, lons: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    m = (w[:, None] * latlon_to_unit(lats, lons)).sum(axis=0)
    return float(np.degrees(np.arctan2(m[2], np.hypot(m[0], m[1])))), float(np.degrees(np.arctan2(m[1], m[0])))


def knn_vote(
    neigh_lats,
    neigh_lons,
    sims,
    sigma_km: float,
    *,
    refine: bool = True,
    power: float = 1.0,
    fine_sigma_km: float | None = None,
) -> tuple[float, float, float]:
    """Kernel-density vote over the top-k neighbours of one query.

    ``neigh_lats``, ``neigh_lons``, ``sims``: 1-D arrays of the same length (the neighbours'
    coordinates in degrees and their similarities to the query; NaN coordinates are ignored).
    ``sigma_km``: kernel bandwidth. With ``refine`` the answer is the weighted mean (weights
    ``w_j`` times the kernel) of the neighbours within ``sigma_km`` of the winning neighbour,
    otherwise that neighbour's own position. Returns ``(lat, lon, score)``, score in [0, 1].
    Ties go to the earlier neighbour; if no neighbour has a positive similarity the first valid
    neighbour is returned with score 0.

    ``fine_sigma_km`` (below ``sigma_km``): a second, finer vote inside the winning place. The
    coarse vote picks the region (the neighbours within ``2 * sigma_km`` of its winner; the score
    is its share), then the same vote with the fine bandwidth picks the spot inside it. For a
    collection spread over the world (``sigma_km`` 25 km) this answers a city's best-supported
    street rather than the city's weighted centre.
    """
    lats = np.asarray(neigh_lats, dtype=np.float64).ravel()
    lons = np.asarray(neigh_lons, dtype=np.float64).ravel()
    s = np.asarray(sims, dtype=np.float64).ravel()
    if not (lats.size == lons.size == s.size):
        raise ValueError(f"lengths differ: {lats.size} lats, {lons.size} lons, {s.size} sims")
    if not sigma_km > 0:
        raise ValueError(f"sigma_km must be > 0, got {sigma_km}")
    valid = np.isfinite(lats) & np.isfinite(lons)
    if not valid.any():
        raise ValueError("no neighbour with valid coordinates")
    lats, lons, s = lats[valid], lons[valid], np.nan_to_num(s[valid], nan=0.0)
    w = np.maximum(s, 0.0) ** float(power)
    total = w.sum()
    if total <= 0:
        return float(lats[0]), float(lons[0]), 0.0
    d = haversine_km(lats[:, None], lons[:, None], lats[None, :], lons[None, :])
    kernel = np.exp(-(d**2) / (2.0 * float(sigma_km) ** 2))
    density = kernel @ w
    best = int(np.argmax(density))  # first maximum on ties
    score = float(min(density[best] / total, 1.0))
    if fine_sigma_km is not None and 0 < fine_sigma_km < sigma_km:
        region = np.flatnonzero(d[best] <= 2.0 * float(sigma_km))
        lat, lon, _ = knn_vote(lats[region], lons[region], s[region], fine_sigma_km, refine=refine, power=power)
        return lat, lon, score
    if not refine:
        return float(lats[best]), float(lons[best]), score
    near = d[best] <= sigma_km
    wn = w[near] * kernel[best, near]
    if wn.sum() <= 0:  # the winner has no weight itself and its support lies beyond sigma
        return float(lats[best]), float(lons[best]), score
    lat, lon = _weighted_mean_latlon(lats[near], lons[near], wn)
    return lat, lon, score


def vote_scales(lats, lons, radius_km: float) -> tuple[float, float | None]:
    """``(sigma_km, fine_sigma_km)`` of an index's kNN vote: the collection's bandwidth
    (:func:`default_sigma_km`) and, where that is coarser than the index's confidence radius, a
    fine vote at that radius inside the winning region (``None`` otherwise)."""
    sigma = default_sigma_km(lats, lons)
    return sigma, fine_scale(sigma, radius_km)


def fine_scale(sigma_km: float, radius_km: float) -> float | None:
    """The fine vote's bandwidth for a collection bandwidth and a confidence radius (or None)."""
    return float(radius_km) if 0 < radius_km < sigma_km else None


def default_sigma_km(lats, lons) -> float:
    """Kernel bandwidth for a collection: a sixth of its median distance to its centroid, kept
    within 25 m .. 25 km (how the divisor was chosen: docs/notes/history.md)."""
    from delg_geo.core.geo import weighted_centroid

    lats = np.asarray(lats, np.float64)
    lons = np.asarray(lons, np.float64)
    clat, clon = weighted_centroid(lats, lons)
    spread = float(np.median(haversine_km(lats, lons, clat, clon)))
    return float(np.clip(spread / 6.0, 0.025, 25.0))


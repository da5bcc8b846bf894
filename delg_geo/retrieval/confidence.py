"""A ``confidence`` that means what it says: the calibration file an index carries, the map from
evidence to the probability of being within the radius, and the confidence in words.

Fitting lives in :mod:`delg_geo.retrieval.calibrate`; this module only reads, applies and writes
the result, so that a query needs nothing of the fitting code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.core.jsonio import dumps as json_dumps
from delg_geo.retrieval.decision import EVIDENCE, EVIDENCE_SIGNS, DecisionRule
from delg_geo.retrieval.monotone import IsotonicMap, LogisticMap, fit_isotonic, fit_logistic

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
DEFAULT_RADIUS_KM = 0.1


@dataclass(frozen=True)
class LeaveOut:
    """Which photos count as a near-duplicate of a self-query (and are left out of its search).

    Photo ``j`` is a near-duplicate of ``i`` when they are at most ``identical_m`` apart (one
    photographer's fixed geotag), or at most ``burst_m`` apart and also adjacent: Flickr-style
    photo ids at most ``max_id_gap`` apart (one upload session), capture times at most
    ``max_time_gap_s`` apart, or the same owner, for whichever of those columns the collection has.
    """

    identical_m: float = 1.0
    burst_m: float = 25.0
    max_id_gap: int = 100_000
    max_time_gap_s: float = 3600.0

    def to_dict(self) -> dict:
        return asdict(self)


# -- the confidence map ----------------------------------------------------------------------

@dataclass
class ConfidenceMap:
    """Evidence -> probability of being within the radius: logistic, then isotonic."""

    logistic: LogisticMap
    isotonic: IsotonicMap

    def __call__(self, evidence) -> np.ndarray:
        return np.clip(self.isotonic(self.logistic(evidence)), 0.0, 1.0)

    def to_dict(self) -> dict:
        return dict(logistic=self.logistic.to_dict(), isotonic=self.isotonic.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "ConfidenceMap":
        return cls(LogisticMap.from_dict(d["logistic"]), IsotonicMap.from_dict(d["isotonic"]))


def fit_confidence(evidence, right, l2: float = 1.0, min_block: int = 10) -> ConfidenceMap:
    evidence = np.asarray(evidence, np.float64)
    right = np.asarray(right, bool)
    lg = fit_logistic(evidence, right, EVIDENCE_SIGNS, l2=l2)
    iso = fit_isotonic(lg(evidence), right, min_block=min_block)
    return ConfidenceMap(lg, iso)


def cross_validated_confidence(evidence, right, folds: int = 5, seed: int = 0, **fit) -> np.ndarray:
    """Out-of-fold confidences: each fold scored by a map fitted on the others."""
    n = len(right)
    out = np.empty(n)
    parts = np.array_split(np.random.default_rng(seed).permutation(n), max(2, min(folds, n)))
    for p in parts:
        train = np.setdiff1d(np.arange(n), p)
        out[p] = fit_confidence(evidence[train], right[train], **fit)(evidence[p])
    return out


# -- the calibration file --------------------------------------------------------------------

@dataclass
class Calibration:
    radius_km: float
    rule: DecisionRule
    confidence_map: ConfidenceMap
    evidence: tuple[str, ...] = EVIDENCE
    leave_out: LeaveOut = field(default_factory=LeaveOut)
    stats: dict = field(default_factory=dict)  # sample size, accuracies, cross-validated ECE, ...
    version: int = CALIBRATION_VERSION

    def confidence(self, evidence) -> np.ndarray:
        return self.confidence_map(evidence)

    def to_dict(self) -> dict:
        return dict(
            version=self.version, radius_km=self.radius_km, rule=self.rule.to_dict(),
            evidence=list(self.evidence), evidence_signs=list(EVIDENCE_SIGNS),
            confidence_map=self.confidence_map.to_dict(), leave_out=self.leave_out.to_dict(), stats=self.stats,
        )

    def save(self, path) -> None:
        from delg_geo.index.geo_index import write_atomic

        write_atomic(Path(path), json_dumps(self.to_dict(), indent=2, default=_json_number))

    @classmethod
    def load(cls, path) -> "Calibration":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if int(d.get("version", 0)) > CALIBRATION_VERSION:
                raise DelgGeoError(f"{path}: calibration version {d['version']} is newer than this delg-geo; upgrade it")
            if tuple(d["evidence"]) != EVIDENCE:
                raise DelgGeoError(
                    f"{path}: fitted on other evidence ({', '.join(d['evidence'])}); "
                    "re-fit it with `delg-geo index calibrate`")
            return cls(
                radius_km=float(d["radius_km"]), rule=DecisionRule(**d["rule"]),
                confidence_map=ConfidenceMap.from_dict(d["confidence_map"]), evidence=tuple(d["evidence"]),
                leave_out=LeaveOut(**d.get("leave_out", {})), stats=d.get("stats", {}), version=int(d["version"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DelgGeoError(f"{path}: unreadable calibration ({e}); re-fit it with `delg-geo index calibrate`") from None


def _json_number(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def write_calibration(index_dir, cal: Calibration) -> None:
    """Write ``calibration.json`` and record it in the manifest (name, size, radius, rule)."""
    from delg_geo.index.geo_index import MANIFEST, read_manifest, write_atomic

    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    cal.save(index_dir / CALIBRATION_FILE)
    m.confidence_radius_km = cal.radius_km
    m.calibration = dict(
        file=CALIBRATION_FILE, size=(index_dir / CALIBRATION_FILE).stat().st_size, radius_km=cal.radius_km,
        rule=cal.rule.to_dict(), sample=cal.stats.get("sample"), cv_ece=cal.stats.get("cv_ece"),
        fitted=cal.stats.get("fitted"), index_updated=m.updated,
    )
    write_atomic(index_dir / MANIFEST, m.to_json())


def set_confidence_radius(index_dir, radius_km: float) -> None:
    """Record the radius ``confidence`` is about in the manifest (a calibration for another
    radius no longer applies and is dropped from it)."""
    from delg_geo.index.geo_index import MANIFEST, read_manifest, write_atomic

    if not radius_km > 0:
        raise DelgGeoError(f"the confidence radius must be positive, got {radius_km} km")
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    if m.confidence_radius_km == float(radius_km):
        return
    m.confidence_radius_km = float(radius_km)
    if m.calibration and m.calibration.get("radius_km") != float(radius_km):
        m.calibration = {}
    write_atomic(index_dir / MANIFEST, m.to_json())


def load_index_calibration(index) -> Calibration | None:
    """The calibration an open index's manifest lists, or None (none fitted, or out of date)."""
    info = index.manifest.calibration or {}
    if not info.get("file"):
        return None
    path = index.path / info["file"]
    if not path.exists() or path.stat().st_size != info.get("size") or info.get("index_updated") != index.manifest.updated:
        return None
    return Calibration.load(path)


# -- in words --------------------------------------------------------------------------------

def format_radius(radius_km: float) -> str:
    """0.1 -> "100 m", 1 -> "1 km", 2.5 -> "2.5 km"."""
    if radius_km < 1:
        return f"{radius_km * 1000:.0f} m"
    return f"{radius_km:g} km"


def confidence_sentence(confidence: float, radius_km: float, calibrated: bool = True) -> str:
    """The confidence as a sentence: "likely within 100 m: 83%".

    Calibrated: "likely" from 0.5, "possibly" from 0.2, else "unlikely".
    Uncalibrated, the number is a score, not a probability, and the sentence says so.
    """
    r = format_radius(radius_km)
    if not calibrated:
        return f"uncalibrated score {confidence:.2f} (run `delg-geo index calibrate` for a probability)"
    c = float(confidence)
    word = "likely" if c >= 0.5 else "possibly" if c >= 0.2 else "unlikely"
    return f"{word} within {r}: {c:.0%}"

"""Evaluate, part three: does ``confidence`` mean what it says?

``confidence`` is meant as the probability that the answer lies within the index's confidence
radius. Against the truth of a query set this module measures:

* a calibration table: equal-width confidence bins, with the mean confidence and the fraction
  actually right in each;
* the expected calibration error (ECE): the bins' ``|fraction right - mean confidence|``,
  weighted by how many answers fall in each;
* the precision and coverage of confident answers: of the answers with confidence at least t,
  the fraction right, and the fraction of queries that get one;
* a reliability plot (fraction right against confidence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class CalibrationBin:
    lo: float
    hi: float
    n: int
    mean_confidence: float  # NaN for an empty bin
    fraction_right: float  # NaN for an empty bin


@dataclass
class ReliabilityReport:
    radius_km: float
    n: int
    ece: float
    accuracy: float  # fraction right overall
    mean_confidence: float
    bins: list[CalibrationBin]
    precision_at: dict[str, float]  # "0.5" -> fraction right among answers with confidence >= 0.5
    coverage_at: dict[str, float]  # "0.5" -> fraction of queries with confidence >= 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(conf, right) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(conf, np.float64).ravel()
    right = np.asarray(right, bool).ravel()
    if conf.shape != right.shape:
        raise ValueError(f"{conf.size} confidences but {right.size} outcomes")
    keep = np.isfinite(conf)
    return np.clip(conf[keep], 0.0, 1.0), right[keep]


def calibration_bins(conf, right, n_bins: int = 10) -> list[CalibrationBin]:
    conf, right = _clean(conf, right)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = which == b
        k = int(m.sum())
        out.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), k,
                                  float(conf[m].mean()) if k else float("nan"),
                                  float(right[m].mean()) if k else float("nan")))
    return out


def expected_calibration_error(conf, right, n_bins: int = 10) -> float:
    """Bin-count-weighted mean of ``|fraction right - mean confidence|`` over equal-width bins."""
    conf, right = _clean(conf, right)
    if conf.size == 0:
        return float("nan")
    bins = calibration_bins(conf, right, n_bins)
    return float(sum(b.n * abs(b.fraction_right - b.mean_confidence) for b in bins if b.n) / conf.size)


def precision_coverage(conf, right, threshold: float) -> tuple[float, float]:
    """(fraction right among answers with ``conf >= threshold``, fraction of answers that qualify)."""
    conf, right = _clean(conf, right)
    m = conf >= threshold
    return (float(right[m].mean()) if m.any() else float("nan")), (float(m.mean()) if conf.size else float("nan"))


def reliability_report(conf, right, radius_km: float, n_bins: int = 10, thresholds=(0.5, 0.8)) -> ReliabilityReport:
    conf, right = _clean(conf, right)
    prec, cov = {}, {}
    for t in thresholds:
        prec[f"{t:g}"], cov[f"{t:g}"] = precision_coverage(conf, right, t)
    return ReliabilityReport(
        radius_km=float(radius_km), n=int(conf.size), ece=expected_calibration_error(conf, right, n_bins),
        accuracy=float(right.mean()) if conf.size else float("nan"),
        mean_confidence=float(conf.mean()) if conf.size else float("nan"),
        bins=calibration_bins(conf, right, n_bins), precision_at=prec, coverage_at=cov,
    )


def format_reliability(rep: ReliabilityReport, method: str = "verified", note: str = "") -> str:
    """Markdown: the calibration table and the headline numbers (``note``: how it was fitted)."""
    from delg_geo.core.geo import format_distance

    r = format_distance(rep.radius_km)
    lines = [
        f"Calibration of `{method}` (confidence = probability of being within {r}; {rep.n} queries"
        f"{'; ' + note if note else ''}): "
        f"ECE {rep.ece:.3f}, mean confidence {rep.mean_confidence:.1%}, fraction right {rep.accuracy:.1%}.",
        "",
        "| confidence | queries | mean confidence | fraction right |",
        "| --- | ---: | ---: | ---: |",
    ]
    for b in rep.bins:
        if b.n:
            lines.append(f"| {b.lo:.1f}–{b.hi:.1f} | {b.n} | {b.mean_confidence:.1%} | {b.fraction_right:.1%} |")
    lines.append("")
    for t in rep.precision_at:
        p, c = rep.precision_at[t], rep.coverage_at[t]
        lines.append(f"* confidence ≥ {t}: {c:.1%} of queries, right {'–' if np.isnan(p) else f'{p:.1%}'}")
    return "\n".join(lines) + "\n"


def reliability_png(conf, right, path, radius_km: float, n_bins: int = 10, title: str | None = None) -> Path:
    """Fraction right against mean confidence per bin (the diagonal is perfect calibration), with
    the share of answers per bin as bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from delg_geo.core.geo import format_distance

    conf, right = _clean(conf, right)
    bins = calibration_bins(conf, right, n_bins)
    path = Path(path)
    fig = Figure(figsize=(5.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 1.0 / n_bins
    share = [b.n / max(1, conf.size) for b in bins]
    ax.bar([b.lo + width / 2 for b in bins], share, width=width * 0.9, color="0.85", label="share of answers")
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8, label="perfect calibration")
    xs = [b.mean_confidence for b in bins if b.n]
    ys = [b.fraction_right for b in bins if b.n]
    ax.plot(xs, ys, marker="o", label=f"fraction right (ECE {expected_calibration_error(conf, right, n_bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel(f"fraction within {format_distance(radius_km)}")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

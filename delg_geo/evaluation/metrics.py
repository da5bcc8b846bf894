"""Geolocation accuracy: summaries at standard radii, published Im2GPS results, tables, CDF plots.

Accuracy at radius r is the fraction of queries whose error is ``<= r`` km. With ``<=`` the
summary rows published by TIBHannover/GeoEstimation (``im2gps_meta/results``) are reproduced
exactly from their own ``great_circle_distance`` column, which is rounded to 0.01 km: some
rows read ``1.00`` for a true error of 0.997 km, and ``<`` would drop them from the 1 km
accuracy (e.g. 10.51 % instead of the published 10.54 % for ISNs_M-fstar-S3 on Im2GPS3k).
On unrounded distances recomputed from the coordinates both operators give the published
numbers, since no error falls exactly on a radius.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from delg_geo.core.errors import MetadataError
from delg_geo.core.geo import format_distance, haversine_km

#: Radii (km) at which accuracy is reported: 25 m, 100 m, 250 m, 1 km (street), 25 km (city),
#: 200 km (region), 750 km (country), 2500 km (continent).
DEFAULT_RADII_KM = (0.025, 0.1, 0.25, 1, 25, 200, 750, 2500)

#: The radii of the Im2GPS benchmark tables.
IM2GPS_RADII_KM = (1, 25, 200, 750, 2500)

PUBLISHED_COLUMNS = (
    "img_id",
    "gt_lat",
    "predicted_lat",
    "gt_long",
    "predicted_long",
    "great_circle_distance",
)


def radius_key(r: float) -> str:
    """The dictionary key for radius ``r`` km: shortest plain decimal, e.g. 0.025 -> "0.025",
    1 -> "1", 2500.0 -> "2500" (never exponent notation)."""
    r = float(r)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"radius must be a finite non-negative number of km, got {r!r}")
    return np.format_float_positional(r, trim="-")


def radius_label(r: float) -> str:
    """Human label for a radius: "25 m" below 1 km, else "25 km"."""
    r = float(r)
    if r < 1:
        return f"{np.format_float_positional(r * 1000, precision=3, trim='-')} m"
    return f"{radius_key(r)} km"


@dataclass
class MethodSummary:
    """Error statistics of one method over ``n`` queries.

    ``accuracy_at_km`` maps :func:`radius_key` of each radius to the fraction (0..1) of queries
    with error ``<=`` that radius. ``queries_per_s`` is None when no timing was given.
    """

    n: int
    median_km: float
    mean_km: float
    accuracy_at_km: dict[str, float] = field(default_factory=dict)
    queries_per_s: float | None = None

    def accuracy(self, radius_km: float) -> float:
        """Accuracy at ``radius_km``; KeyError naming the available radii if it was not computed."""
        key = radius_key(radius_km)
        try:
            return self.accuracy_at_km[key]
        except KeyError:
            raise KeyError(
                f"no accuracy at {key} km; computed at {sorted(self.accuracy_at_km, key=float)}"
            ) from None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(errors_km, radii=DEFAULT_RADII_KM, seconds: float | None = None) -> MethodSummary:
    """Summarise per-query errors (km).

    A failed prediction should be passed as ``np.inf``: it counts as a miss at every radius
    (and makes the mean infinite). NaN and negative errors raise ValueError. ``seconds`` is the
    wall time for all queries; ``queries_per_s = n / seconds``.
    """
    e = np.asarray(errors_km, dtype=np.float64).ravel()
    if np.any(np.isnan(e)):
        raise ValueError(
            f"{int(np.isnan(e).sum())} errors are NaN; pass np.inf for a query without a prediction"
        )
    if np.any(e < 0):
        raise ValueError("errors must be non-negative distances in km")
    n = int(e.size)
    keys = [radius_key(r) for r in radii]
    if n == 0:
        acc = {k: float("nan") for k in keys}
        median = mean = float("nan")
    else:
        acc = {k: float(np.count_nonzero(e <= float(k)) / n) for k in keys}
        median = float(np.median(e))
        with np.errstate(invalid="ignore"):
            mean = float(np.mean(e))
    qps = None
    if seconds is not None:
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite non-negative number, got {seconds!r}")
        qps = float(n / seconds) if seconds > 0 else float("inf")
    return MethodSummary(n=n, median_km=median, mean_km=mean, accuracy_at_km=acc, queries_per_s=qps)


_ACC_HEADER = re.compile(r"acc\w*\s*\(\s*([0-9]*\.?[0-9]+)\s*km\s*\)", re.IGNORECASE)
_MEAN_HEADER = re.compile(r"mean", re.IGNORECASE)
_MEDIAN_HEADER = re.compile(r"median", re.IGNORECASE)


def read_published_results(path) -> tuple[pd.DataFrame, dict]:
    """Read a GeoEstimation per-image result file (``im2gps_meta/results/<set>/<model>.csv``).

    The file is a CSV with :data:`PUBLISHED_COLUMNS`, then a blank line, then a one-row summary
    whose header reads e.g. ``street acc (1km),...,continent acc (2500km),mean deviation (km)``.
    Both LF and CRLF line ends occur.

    Returns ``(per_image, summary)``: ``per_image`` is a DataFrame with the six columns;
    ``summary`` is ``{"n": rows, "accuracy_at_km": {"1": 0.151899, ...}, "mean_km": ...,
    "columns": {original header: value}}`` (``accuracy_at_km`` keyed by :func:`radius_key`,
    fractions 0..1). The summary is ``{"n": rows}`` alone if the file has no summary block.
    Raises MetadataError if the file is missing or not in this layout.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MetadataError(f"{p}: results file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{p}: cannot read results file ({exc})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    if not blocks:
        raise MetadataError(f"{p}: empty results file")
    try:
        df = pd.read_csv(io.StringIO("\n".join(blocks[0])))
    except (pd.errors.ParserError, ValueError) as exc:
        raise MetadataError(f"{p}: cannot parse per-image rows ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in PUBLISHED_COLUMNS if c not in df.columns]
    if missing:
        raise MetadataError(
            f"{p}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)})"
        )
    for c in PUBLISHED_COLUMNS[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    summary: dict = {"n": len(df)}
    if len(blocks) > 1:
        summ = blocks[1]
        if len(summ) < 2:
            raise MetadataError(f"{p}: summary block has a header but no values")
        header = [h.strip() for h in summ[0].split(",")]
        values = [v.strip() for v in summ[1].split(",")]
        if len(header) != len(values):
            raise MetadataError(
                f"{p}: summary header has {len(header)} fields but its row has {len(values)}"
            )
        cols: dict[str, float] = {}
        acc: dict[str, float] = {}
        for h, v in zip(header, values):
            try:
                val = float(v)
            except ValueError:
                raise MetadataError(f"{p}: summary value {v!r} for {h!r} is not a number") from None
            cols[h] = val
            m = _ACC_HEADER.search(h)
            if m:
                acc[radius_key(float(m.group(1)))] = val
            elif _MEAN_HEADER.search(h):
                summary["mean_km"] = val
            elif _MEDIAN_HEADER.search(h):
                summary["median_km"] = val
        summary["accuracy_at_km"] = acc
        summary["columns"] = cols
    return df, summary


def published_errors_km(df: pd.DataFrame, recompute: bool = False) -> np.ndarray:
    """Per-image errors of a published results table: the ``great_circle_distance`` column, or
    with ``recompute=True`` the haversine distance from the true and predicted coordinates."""
    if recompute:
        return np.asarray(
            haversine_km(df["gt_lat"], df["gt_long"], df["predicted_lat"], df["predicted_long"]),
            dtype=np.float64,
        )
    return df["great_circle_distance"].to_numpy(dtype=np.float64)




def format_table(summaries: dict[str, MethodSummary], radii=DEFAULT_RADII_KM) -> str:
    """A Markdown table: one row per method, accuracy in % (1 decimal) at each radius, the median
    and mean error (metres below 1 km, else km), and queries/s when any method was timed.
    A radius a summary was not computed at shows as "–"."""
    radii = list(radii)
    timed = any(s.queries_per_s is not None for s in summaries.values())
    header = ["Method", "n"] + [radius_label(r) for r in radii] + ["median", "mean"]
    if timed:
        header.append("queries/s")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for name, s in summaries.items():
        row = [str(name).replace("|", "\\|"), str(s.n)]
        for r in radii:
            v = s.accuracy_at_km.get(radius_key(r))
            row.append("–" if v is None or math.isnan(v) else f"{100.0 * v:.1f}")
        row += [format_distance(s.median_km), format_distance(s.mean_km)]
        if timed:
            q = s.queries_per_s
            row.append("–" if q is None else ("∞" if math.isinf(q) else f"{q:.2f}"))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def error_cdf_png(
    errors_by_method: dict[str, np.ndarray], path, title: str | None = None, radii=DEFAULT_RADII_KM
) -> Path:
    """Plot the cumulative distribution of errors of every method on one log-x figure.

    Errors below 1 m are drawn at 1 m; infinite errors (failures) keep the curve below 1.
    Dotted vertical lines mark ``radii``. Uses the Agg canvas directly (no pyplot, no global
    backend change). Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo_km, hi_km = 1e-3, 2.5e4
    for name, errs in errors_by_method.items():
        e = np.asarray(errs, dtype=np.float64).ravel()
        e = e[~np.isnan(e)]
        n = e.size
        if n == 0:
            continue
        finite = np.sort(np.clip(e[np.isfinite(e)], lo_km, None))
        if finite.size:
            hi_km = max(hi_km, float(finite[-1]) * 1.2)
        y = np.arange(1, finite.size + 1) / n
        xs = np.concatenate([[lo_km], finite, [hi_km]])
        ys = np.concatenate([[0.0], y, [y[-1] if y.size else 0.0]])
        ax.step(xs, ys, where="post", label=f"{name} (n={n})")
    for r in radii:
        ax.axvline(float(r), color="0.7", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lo_km, hi_km)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("error (km)")
    ax.set_ylabel("fraction of queries within error")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)
    if errors_by_method:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

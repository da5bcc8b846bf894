"""Stage 5 — locate: a photo's position from its verified nearest neighbours.

``Geolocator.from_index(path).locate(image)`` extracts the query's features, searches the
global index for the top-k candidates (and, where the index has an ASMK inverted file, adds the
top ``local_top_k`` of its local features: :func:`delg_geo.retrieval.search.shortlist`), verifies each
candidate's local features geometrically, and answers with the location of the best verified
neighbour:

* **Verified neighbours vote.** Each candidate's support is the sum, over candidates within
  ``vote_radius_km`` of it (itself included), of ``max(inliers - vote_base_inliers, 0)``; the
  candidate with the most support wins (ties: more inliers). One wrong candidate with a few
  chance inliers then loses to a place that several photos verify.
* **Fallback.** When no candidate reaches ``min_inliers``, the answer is a kernel-density vote
  over the global top-k ([L]kNN, ``fallback="knn"``) or the global top-1 (``fallback="global"``),
  and ``method`` is ``global`` with a note that says so. With verification off (``--no-verify``)
  the answer is the plain global top-1.

How each step moves accuracy: docs/results.md and docs/notes/history.md.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from delg_geo.core.errors import DelgGeoError, ImageLoadError, IndexFormatError, InvalidArgumentError
from delg_geo.features.base import Features
from delg_geo.core.geo import haversine_km
from delg_geo.features.images import LoadedImage, load_image
from delg_geo.features.extract import min_image_side
from delg_geo.index.geo_index import GeoIndex
from delg_geo.retrieval.search import shortlist
from delg_geo.retrieval.verify import VERIFY_DEFAULTS, VerifyConfig, verify_pair
from delg_geo.retrieval.decision import DecisionRule, decide_candidates, evidence_at, vote_verified  # noqa: F401 (re-exported)

#: ``vote_base_inliers`` per local-feature type: about the 90th percentile of wrong pairs' inliers.
VOTE_BASE_DEFAULTS = {"delg": 10, "xfeat": 10, "aliked-n16": 10}


@dataclass(frozen=True)
class LocateConfig:
    top_k: int = 100
    local_top_k: int | None = None  # candidates the ASMK inverted file adds (where the index has one): None as many as top_k, 0 none
    verify: bool = True
    verify_config: VerifyConfig | None = None  # None: the defaults of the index's local features
    distinct_km: float = 0.05  # alternatives closer than this to a shown place are the same place
    vote_radius_km: float = 0.06  # verified candidates this close support each other
    vote_base_inliers: int | None = None  # inliers up to this count are chance; None: per local type
    fallback: str = "knn"  # "knn" or "global", when nothing verifies
    knn_sigma_km: float | None = None  # None: from the collection's extent (knn.default_sigma_km)
    num_alternatives: int = 5
    workers: int = 2  # verification threads
    places: bool = True  # attach the nearest place name (offline reverse geocoding)
    calibrated: bool = True  # use the index's calibration (decision rule and confidence) when it has one

    def __post_init__(self):
        """Refuse values that would fail later with a cryptic message (``top_k="5"``: "slice
        indices must be integers"): counts must be whole numbers, ``top_k`` at least 1."""
        for name, low in (("top_k", 1), ("local_top_k", 0), ("num_alternatives", 0), ("workers", 1)):
            v = getattr(self, name)
            if v is None and name == "local_top_k":
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InvalidArgumentError(f"{name} must be a whole number, got {v!r} ({type(v).__name__})")
            if v < low:
                raise InvalidArgumentError(f"{name} must be at least {low}, got {v}")
            object.__setattr__(self, name, int(v))
        if self.fallback not in ("knn", "global"):
            raise InvalidArgumentError(f"fallback must be 'knn' or 'global', got {self.fallback!r}")


@dataclass
class Neighbour:
    id: int
    image: str
    lat: float
    lon: float
    similarity: float
    inliers: int


@dataclass
class Alternative:
    id: int
    image: str
    lat: float
    lon: float
    score: float  # confidence-like score of this place
    inliers: int
    similarity: float
    distance_km: float  # from the prediction
    place: dict | None = None  # nearest named place: name, admin1, country_code


@dataclass
class Prediction:
    image: str
    lat: float
    lon: float
    method: str  # "verified" or "global"
    confidence: float  # 0..1: probability of being within confidence_radius_km (when calibrated)
    inliers: int
    neighbour: Neighbour
    alternatives: list[Alternative]
    timings_ms: dict
    note: str = ""
    place: dict | None = None  # nearest named place: name, admin1, country_code
    confidence_radius_km: float = 0.1
    calibrated: bool = False  # False: confidence is an uncalibrated score (the index has no calibration)
    confidence_text: str = ""  # the confidence in words, e.g. "likely within 100 m: 83%"
    candidates: int = 0  # how many candidates were searched out (and verified, unless verification is off)
    #: the inlier matches of the answer's own verification of ``neighbour``: (K, 4) float32 rows of
    #: query x, y and neighbour x, y in original-image pixels, K == ``inliers`` (None: not verified
    #: here). RANSAC is randomised, so a match picture draws these rather than verifying again.
    matches: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The prediction as JSON-ready data (``matches`` left out: see :attr:`matches`)."""
        d = asdict(replace(self, matches=None))
        del d["matches"]
        return d


def extract_one(extractor, img: LoadedImage, label: str) -> Features:
    """``extractor.extract(img)``; a failure of the network on this image (an aspect it cannot
    take, ...) becomes an :class:`ImageLoadError` naming ``label``, as ``index build`` lists it."""
    try:
        return extractor.extract(img)
    except DelgGeoError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - TensorFlow's errors share no base class with ValueError
        raise ImageLoadError(label, f"feature extraction failed ({type(e).__name__}: {e})") from None


def _confidence(inliers: int, min_inliers: int) -> float:
    """Inlier count -> 0..1; reaches 0.5 at the verification threshold."""
    return float(inliers / (inliers + min_inliers)) if inliers > 0 else 0.0


class Geolocator:
    """Python API mirroring ``delg-geo query``."""

    def __init__(self, index: GeoIndex, extractor, config: LocateConfig | None = None):
        index.check_model(extractor.model_id, extractor.fingerprint)
        local = getattr(extractor, "local_features", "delg")
        index.check_local(local, getattr(extractor, "local_fingerprint", ""))
        self.index = index
        self.extractor = extractor
        config = config or LocateConfig()
        self.config = replace(
            config,
            verify_config=config.verify_config or VERIFY_DEFAULTS[local],
            vote_base_inliers=VOTE_BASE_DEFAULTS[local] if config.vote_base_inliers is None else config.vote_base_inliers,
            local_top_k=int(config.top_k if config.local_top_k is None else config.local_top_k),
        )
        from delg_geo.retrieval.confidence import load_index_calibration

        vc = self.config.verify_config
        self.calibration = load_index_calibration(index) if self.config.calibrated else None
        self.rule = (self.calibration.rule if self.calibration
                     else DecisionRule(vc.min_inliers, self.config.vote_base_inliers, self.config.vote_radius_km))
        self.confidence_radius_km = float(self.calibration.radius_km if self.calibration
                                          else index.manifest.confidence_radius_km)
        from delg_geo.retrieval.knn import vote_scales

        # the kNN fallback's bandwidth: the collection's, then the confidence radius inside the
        # winning region when the collection is wider (a world index: 25 km, then 100 m)
        self.knn_sigma_km, self.knn_fine_km = ((self.config.knn_sigma_km, None) if self.config.knn_sigma_km
                                               else vote_scales(index.lats, index.lons, self.confidence_radius_km))
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.config.workers))

    @classmethod
    def from_index(
        cls,
        index_dir: str | Path,
        model: str | None = None,
        config: LocateConfig | None = None,
        device: str = "auto",
        local: str | None = None,
        **locate_options,
    ) -> "Geolocator":
        from delg_geo.features.models import get_extractor

        index = GeoIndex(index_dir, device=device)
        m = index.manifest
        name = model or m.model_id
        if model is None and m.model_path:  # built with --model PATH: the folder it recorded
            from delg_geo.core.errors import ModelError
            from delg_geo.features.models.registry import MODELS

            if Path(m.model_path).is_dir():
                name = m.model_path
            elif m.model_id not in MODELS:
                raise ModelError(
                    f"{index_dir} was built with the SavedModel folder {m.model_path} (model {m.model_id}), "
                    "which is no longer there; pass --model PATH with that SavedModel's folder"
                )
        elif model is None and m.model_id.startswith("delg-savedmodel-"):
            from delg_geo.core.errors import ModelError

            raise ModelError(
                f"{index_dir} was built with a SavedModel folder (model {m.model_id}) that its manifest does not "
                "record; pass --model PATH with that SavedModel's folder"
            )
        options = {}
        if name == m.model_id and name == "efficientnet-lite0" and m.model_config:
            from delg_geo.features.models.lite_delg import LiteDelgConfig

            cfg = dict(m.model_config)
            for k in ("scales", "global_scales"):
                if k in cfg:
                    cfg[k] = tuple(cfg[k])
            options["config"] = LiteDelgConfig(**cfg)
        if name == m.model_id and m.adapt:  # an adapted index: its weights (checked) give the global descriptor
            from delg_geo.index.adapted_file import load_adapted

            weights = load_adapted(index.path, m)
            if weights.kind == "finetune":
                options["adapted"] = weights
        # local features: the index's choice (and settings) unless the caller names another
        local = local or m.local_features
        if local != "delg" and local == m.local_features:
            options["local_options"] = dict(m.local_config)
        extractor = get_extractor(name, local=local, **options)
        if config is None:
            config = LocateConfig(**locate_options)
        return cls(index, extractor, config)

    # -- main entry points --------------------------------------------------------------------
    def locate(self, image, name: str | None = None) -> Prediction:
        """Locate one photo: a path, the bytes of an encoded image (bytes, bytearray,
        memoryview), a binary file object, a PIL image, a numpy uint8 array or a
        :class:`LoadedImage` (:func:`~delg_geo.features.images.load_image`). ``name`` labels the
        answer (default: the path, or ``<bytes>``, ``<array>``, ...; never the data itself).
        Raises :class:`ImageLoadError` for an input that is no usable image, with the reason."""
        from delg_geo.features.base import features_problem

        t0 = time.perf_counter()
        img = image if isinstance(image, LoadedImage) else load_image(
            image, max_side=self.extractor.max_side, min_side=min_image_side(self.extractor))
        label = str(name or img.path or "<image>")
        feats = extract_one(self.extractor, img, label)
        why = features_problem(feats)
        if why:
            raise ImageLoadError(label, why)
        t_extract = (time.perf_counter() - t0) * 1e3
        return self.locate_features(feats, label, extract_ms=t_extract)

    def locate_many(self, paths: Iterable[str | Path], progress: bool = False) -> Iterator[Prediction | ImageLoadError]:
        """Batched extraction, then search and verification per query; errors are yielded, not raised."""
        for pred, _ in self.locate_many_with_features(paths, progress):
            yield pred

    def locate_many_with_features(self, paths: Iterable[str | Path], progress: bool = False):
        """As :meth:`locate_many`, yielding ``(prediction or error, the query's Features or None)``:
        what a match picture needs to show the very verification the answer came from."""
        from delg_geo.features.extract import iter_extract

        for res in iter_extract(list(paths), self.extractor, progress="query" if progress else False):
            if not res.ok:
                yield ImageLoadError(res.path, res.error.split(": ", 1)[-1] if res.error else "failed"), None
                continue
            yield self.locate_features(res.features, res.path, extract_ms=res.seconds * 1e3), res.features

    def locate_features(self, feats: Features, label: str = "", extract_ms: float = 0.0) -> Prediction:
        cfg = self.config
        if feats.model_id != self.index.manifest.model_id:
            raise DelgGeoError(f"features from model {feats.model_id!r} cannot query this index")
        t1 = time.perf_counter()
        vc = cfg.verify_config
        q_local = self.index.query_local(feats.local_descriptors[: vc.max_features])
        qw = self.index.whitening.apply(np.atleast_2d(feats.global_descriptor))
        cand = shortlist(self.index, qw, q_local, cfg.top_k, cfg.local_top_k)
        t2 = time.perf_counter()
        inliers = np.zeros(len(cand.ids), np.int64)
        checks = []
        if cfg.verify and len(cand.ids):
            checks = self.verifications(feats, cand.ids, q_local)
            inliers = np.array([-1 if v is None else v.inliers for v in checks], np.int64)
        t3 = time.perf_counter()
        timings = {"extract": round(extract_ms, 2), "search": round((t2 - t1) * 1e3, 2), "verify": round((t3 - t2) * 1e3, 2)}
        pred = self.decide(label, cand.ids, cand.similarities, inliers, timings)
        pred.candidates = int(len(cand.ids))
        if checks:
            pred.matches = self._neighbour_matches(feats, cand.ids, checks, pred.neighbour.id)
        return pred

    def _neighbour_matches(self, feats: Features, ids: np.ndarray, checks: list, nid: int) -> np.ndarray:
        """The inlier matches of the verification of candidate ``nid`` (see ``Prediction.matches``)."""
        pos = np.flatnonzero(np.asarray(ids) == nid)
        v = checks[int(pos[0])] if len(pos) else None
        if v is None or len(v.inlier_pairs) == 0:
            return np.zeros((0, 4), np.float32)
        pairs = np.asarray(v.inlier_pairs, np.int64)
        kp, _ = self.index.local_features(int(nid))
        q_kp = np.asarray(feats.keypoints[: self.config.verify_config.max_features], np.float32)
        return np.hstack([q_kp[pairs[:, 0]], np.asarray(kp, np.float32)[pairs[:, 1]]]).astype(np.float32)

    def verify_candidates(self, feats: Features, ids: np.ndarray, q_desc: np.ndarray | None = None) -> np.ndarray:
        """Inliers per candidate; -1 marks a candidate whose stored local features are damaged
        (:meth:`decide` leaves it out, with a note). ``q_desc``: the query's local descriptors
        already in the store's matching space."""
        return np.array([-1 if v is None else v.inliers for v in self.verifications(feats, ids, q_desc)], np.int64)

    def verifications(self, feats: Features, ids: np.ndarray, q_desc: np.ndarray | None = None) -> list:
        """The :class:`~delg_geo.retrieval.verify.Verification` of each candidate (inliers and
        inlier pairs), None for a candidate whose stored local features are damaged."""
        vc = self.config.verify_config
        q_kp = feats.keypoints[: vc.max_features]
        if q_desc is None:
            q_desc = self.index.query_local(feats.local_descriptors[: vc.max_features])

        def one(i: int):
            kp, desc = self.index.local_features(int(i))
            if self.index.candidate_problem(int(i), kp, desc):
                return None
            return verify_pair(q_kp, q_desc, kp, desc, vc, feats.image_size, self.index.image_size(int(i)))

        from delg_geo.core.runtime import single_threaded_blas

        with single_threaded_blas():  # one BLAS thread per verification thread (runtime.py: 5x faster under load)
            return list(self._pool.map(one, ids))

    # -- decision ---------------------------------------------------------------------------
    def decide(self, label, ids, sims, inliers, timings=None) -> Prediction:
        """The answer for one query from its candidates (ids, similarities, inliers)."""
        timings = timings or {}
        cfg = self.config
        rule = self.rule
        ids, sims, inliers = np.asarray(ids), np.asarray(sims), np.asarray(inliers)
        if len(ids) == 0:
            from delg_geo.index.integrity import damaged_message

            raise IndexFormatError(damaged_message(self.index.path, "global.faiss", "returned no candidates for a valid query"))
        damage_note = ""
        if (inliers < 0).any():  # damaged candidates: skipped, never used silently
            bad = ids[inliers < 0]
            whys = [f"id {int(i)} ({self.index.image_name(int(i))}): {self.index.candidate_problem(int(i), *self.index.local_features(int(i)))}"
                    for i in bad[:3]]
            damage_note = (f"skipped {len(bad)} damaged candidate(s) whose stored local features cannot be trusted "
                           f"({'; '.join(whys)}{'; ...' if len(bad) > 3 else ''}); check the index with "
                           "`delg-geo index verify`")
            keep = inliers >= 0
            ids, sims, inliers = ids[keep], sims[keep], inliers[keep]
            if len(ids) == 0:
                raise IndexFormatError(f"damaged index {self.index.path}: every candidate was damaged; {damage_note}")
        sims = sims.astype(np.float64)
        lats_c = self.index.lats[ids]
        lons_c = self.index.lons[ids]
        d = decide_candidates(lats_c, lons_c, sims, inliers, rule, verify=cfg.verify, fallback=cfg.fallback,
                              knn_sigma_km=self.knn_sigma_km, knn_fine_km=self.knn_fine_km)
        best, order, lat, lon, verified = d.best, d.order, d.lat, d.lon, d.verified
        bid = int(ids[best])
        method, note = ("verified", "") if verified else ("global", "")
        if not verified:
            top = int(np.argmax(inliers)) if len(inliers) else 0
            why = (f"no candidate reached {rule.min_inliers} inliers (the most: {int(inliers[top])}, "
                   f"{self.index.image_name(int(ids[top]))})" if cfg.verify and len(inliers) and inliers[top] > 0
                   else f"no candidate reached {rule.min_inliers} inliers (none had any)" if cfg.verify
                   else "verification disabled")
            how = (f"a kernel-density vote over the global top-{len(ids)}" if np.isfinite(d.knn_score)
                   else "the global top-1")
            note = f"{why}; answered with {how}"

        def score(j: int, plat: float, plon: float, is_verified: bool, knn_score: float = float("nan")) -> float:
            if self.calibration is not None:
                ev = evidence_at(plat, plon, lats_c, lons_c, sims, inliers, rule, self.calibration.radius_km, is_verified)
                return float(self.calibration.confidence(ev)[0])
            if verified:  # uncalibrated: inliers / (inliers + min_inliers), global answers at most 0.5
                return _confidence(int(inliers[j]), rule.min_inliers)
            return float(max(0.0, sims[j]) * 0.5 * (knn_score if np.isfinite(knn_score) else 1.0))

        conf = score(best, lat, lon, verified, d.knn_score)
        neighbour = Neighbour(bid, self.index.image_name(bid), float(self.index.lats[bid]), float(self.index.lons[bid]),
                              float(sims[best]), int(inliers[best]))
        alts: list[Alternative] = []
        shown = [(lat, lon)]
        for j in order[1:]:
            if len(alts) >= cfg.num_alternatives:
                break
            cid = int(ids[j])
            clat, clon = float(self.index.lats[cid]), float(self.index.lons[cid])
            dist = haversine_km(np.array([clat] * len(shown)), np.array([clon] * len(shown)),
                                np.array([s[0] for s in shown]), np.array([s[1] for s in shown]))
            if np.min(dist) < cfg.distinct_km:
                continue
            shown.append((clat, clon))
            s = score(int(j), clat, clon, bool(verified and inliers[j] >= rule.min_inliers))
            alts.append(Alternative(cid, self.index.image_name(cid), clat, clon, round(s, 4), int(inliers[j]),
                                    float(sims[j]), float(dist[0])))
        pred = Prediction(
            image=str(label), lat=lat, lon=lon, method=method, confidence=round(conf, 4),
            inliers=int(inliers[best]), neighbour=neighbour, alternatives=alts, timings_ms=timings,
            note="; ".join(n for n in (note, damage_note) if n),
            confidence_radius_km=self.confidence_radius_km, calibrated=self.calibration is not None,
        )
        from delg_geo.retrieval.confidence import confidence_sentence

        pred.confidence_text = confidence_sentence(pred.confidence, pred.confidence_radius_km, pred.calibrated)
        if cfg.places:
            from delg_geo.core.places import place_dicts

            short = place_dicts([lat] + [a.lat for a in alts], [lon] + [a.lon for a in alts])
            pred.place = short[0]
            for a, p in zip(alts, short[1:]):
                a.place = p
        return pred

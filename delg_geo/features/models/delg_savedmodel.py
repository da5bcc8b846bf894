"""Feature extraction with an official DELG SavedModel (or any SavedModel with its signature).

The recipe is the one of tensorflow/models ``research/delf`` (``delf/python/extractor.py`` with
the ``delg/*_config.pbtxt`` settings):

* the image, longest side at most ``max_side`` (1024), is fed as uint8 with the seven pyramid
  scales 0.25 ... 2.0, the attention threshold ``input_abs_thres`` of the model's config and
  ``input_max_feature_num`` 1000;
* the global descriptor comes from scales 0.7071, 1 and 1.4142 (``input_global_scales_ind``
  3, 4, 5): each per-scale descriptor is L2-normalised, they are summed and the sum is
  L2-normalised;
* ``boxes`` are receptive fields ``[ymin, xmin, ymax, xmax]`` in pixels of the image fed to the
  model; a keypoint is the centre of its box, mapped back to the original image; local
  descriptors are L2-normalised. ``scales`` are the model's output, which for the official
  models is 1 / pyramid scale (larger for larger image regions, the DELF convention).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from delg_geo.core.errors import ModelError
from delg_geo.features.base import Features, l2_normalize
from delg_geo.features.images import LoadedImage
from delg_geo.features.models import fetch, registry

#: Attention threshold for a SavedModel that is not in the registry (value of r50delg_gld).
DEFAULT_ABS_THRES = 175.0
#: Images with a side shorter than this are upscaled first (the official extractor returns no
#: features below 10 pixels; we prefer a valid, if poor, record).
MIN_SIDE = 10
_GLOBAL_SCALES = tuple(registry.IMAGE_SCALES[i] for i in registry.GLOBAL_SCALE_IDS)


def savedmodel_fingerprint(path: str | Path) -> str:
    """sha256 over ``saved_model.pb`` and every file under ``variables/`` (names and bytes)."""
    path = Path(path)
    files = [path / "saved_model.pb"]
    var_dir = path / "variables"
    if var_dir.is_dir():
        files += sorted(p for p in var_dir.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _global_ids_for(scales: Sequence[float]) -> tuple[int, ...]:
    ids = tuple(
        i for i, s in enumerate(scales) if any(abs(s - g) < 1e-3 for g in _GLOBAL_SCALES)
    )
    return ids or tuple(range(len(scales)))


def _static_last_dim(spec) -> int | None:
    shape = getattr(spec, "shape", None)
    if shape is None or shape.rank is None or shape.rank == 0:
        return None
    d = shape.as_list()[-1]
    return int(d) if d else None


class DelgSavedModelExtractor:
    """An :class:`~delg_geo.features.models.Extractor` running a DELG SavedModel's serving signature."""

    def __init__(
        self,
        path: str | Path,
        model_id: str | None = None,
        abs_thres: float | None = None,
        max_feature_num: int = registry.MAX_FEATURE_NUM,
        max_side: int = registry.MAX_IMAGE_SIZE,
        scales: Sequence[float] = registry.IMAGE_SCALES,
        global_scale_ids: Sequence[int] | None = None,
    ):
        self.path = Path(path).expanduser()
        official = registry.MODELS.get(model_id or "") or registry.MODELS.get(self.path.name)
        if abs_thres is None:
            abs_thres = official.abs_thres if official else DEFAULT_ABS_THRES
        self.abs_thres = float(abs_thres)
        if int(max_feature_num) < 0:
            raise ModelError(f"max_feature_num must be >= 0, got {max_feature_num}")
        self.max_feature_num = int(max_feature_num)
        if int(max_side) < MIN_SIDE:
            raise ModelError(f"max_side must be at least {MIN_SIDE}, got {max_side}")
        self.max_side = int(max_side)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not (s > 0 and math.isfinite(s)) for s in self.scales):
            raise ModelError(f"scales must be positive numbers, got {scales!r}")
        if global_scale_ids is None:
            global_scale_ids = _global_ids_for(self.scales)
        self.global_scale_ids = tuple(int(i) for i in global_scale_ids)
        if not self.global_scale_ids or any(
            not 0 <= i < len(self.scales) for i in self.global_scale_ids
        ):
            raise ModelError(
                f"global_scale_ids {self.global_scale_ids} must index scales {self.scales}"
            )
        self._loaded, self._fn, self.signature = fetch.load_checked(self.path)
        self._inputs = self.signature.inputs
        self.fingerprint = savedmodel_fingerprint(self.path)
        self.model_id = model_id or (
            official.name if official else f"delg-savedmodel-{self.fingerprint[:12]}"
        )

        self.local_dim = _static_last_dim(self.signature.outputs.get("features"))
        self.global_dim = _static_last_dim(self.signature.outputs.get("global_descriptors"))
        if self.local_dim is None or self.global_dim is None:
            if official is not None:
                self.local_dim = self.local_dim or official.local_dim
                self.global_dim = self.global_dim or official.global_dim
            else:  # learn them from one small run
                out = self._run(np.full((64, 64, 3), 128, np.uint8))
                feats = np.asarray(out["features"])
                self.local_dim = self.local_dim or (int(feats.shape[-1]) if feats.ndim == 2 else 0)
                gdesc = np.asarray(out["global_descriptors"])
                self.global_dim = self.global_dim or int(gdesc.shape[-1])

    @classmethod
    def from_registry(cls, name: str, **options) -> "DelgSavedModelExtractor":
        """The installed registry model ``name``; a helpful :class:`ModelError` if not installed."""
        if name not in registry.MODELS:
            known = ", ".join(registry.MODELS)
            raise ModelError(f"unknown DELG model {name!r}; known: {known}")
        path = fetch.require_installed(name)
        options.setdefault("abs_thres", registry.MODELS[name].abs_thres)
        options.setdefault("model_id", name)
        return cls(path, **options)

    def __repr__(self) -> str:
        return f"DelgSavedModelExtractor({self.model_id!r}, path={str(self.path)!r})"

    # ----------------------------------------------------------------------------------------

    def _feed(self, name: str, value) -> object:
        import tensorflow as tf

        return tf.constant(value, dtype=self._inputs[name].dtype)

    def _run(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        kwargs = {
            "input_image": self._feed("input_image", arr),
            "input_scales": self._feed("input_scales", list(self.scales)),
            "input_max_feature_num": self._feed("input_max_feature_num", self.max_feature_num),
            "input_abs_thres": self._feed("input_abs_thres", self.abs_thres),
        }
        if self.signature.has_global_scales_ind:
            kwargs["input_global_scales_ind"] = self._feed(
                "input_global_scales_ind", list(self.global_scale_ids)
            )
        try:
            out = self._fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - surface TF runtime failures as model errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelError(
                f"{self.model_id}: the SavedModel failed on an image ({first})"
            ) from None
        return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in out.items()}

    def _fit(self, arr: np.ndarray) -> np.ndarray:
        """Downsize to ``max_side`` (bilinear, like the official ``ResizeImage``); upsize tiny ones."""
        h, w = arr.shape[:2]
        f = 1.0
        if max(h, w) > self.max_side:
            f = self.max_side / float(max(h, w))
        if min(h, w) * f < MIN_SIDE:
            f = MIN_SIDE / float(min(h, w))
        if f == 1.0:
            return arr
        from PIL import Image

        size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
        return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR), dtype=np.uint8)

    def extract(self, image: LoadedImage) -> Features:
        arr = np.asarray(image.array)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            name = image.path or "<image>"
            raise ModelError(f"{name}: expected an RGB image, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        ow, oh = (int(v) for v in image.original_size)
        inp = np.ascontiguousarray(self._fit(arr))
        ih, iw = inp.shape[:2]
        out = self._run(inp)

        # Global: per-scale L2, sum, L2 (a model that pools itself returns one vector).
        g = np.asarray(out["global_descriptors"], np.float32)
        if g.ndim == 2:
            if not self.signature.has_global_scales_ind and g.shape[0] == len(self.scales):
                g = g[list(self.global_scale_ids)]
            g = l2_normalize(l2_normalize(g, axis=1).sum(axis=0))
        elif g.ndim == 1:
            g = l2_normalize(g)
        else:
            raise ModelError(f"{self.model_id}: global_descriptors has shape {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ModelError(f"{self.model_id}: the global descriptor is not finite")

        # Local: centres of the receptive boxes [ymin, xmin, ymax, xmax] in the fed image.
        boxes = np.asarray(out["boxes"], np.float32).reshape(-1, 4)
        n = boxes.shape[0]
        desc = np.asarray(out["features"], np.float32).reshape(n, -1) if n else np.zeros(
            (0, self.local_dim or 0), np.float32
        )
        scores = np.asarray(out["scores"], np.float32).reshape(-1)
        fscales = np.asarray(out["scales"], np.float32).reshape(-1)
        if scores.shape[0] != n or fscales.shape[0] != n:
            raise ModelError(
                f"{self.model_id}: inconsistent outputs ({n} boxes, {scores.shape[0]} scores, "
                f"{fscales.shape[0]} scales)"
            )
        order = np.argsort(-scores, kind="stable")[: self.max_feature_num]
        boxes, desc, scores, fscales = boxes[order], desc[order], scores[order], fscales[order]
        cy = (boxes[:, 0] + boxes[:, 2]) / 2.0
        cx = (boxes[:, 1] + boxes[:, 3]) / 2.0
        # fed-image pixels -> original pixels, per axis (fed size / original size)
        x = cx * (ow / float(iw))
        y = cy * (oh / float(ih))
        x = np.clip(x, 0.0, max(ow - 1, 0))
        y = np.clip(y, 0.0, max(oh - 1, 0))
        return Features(
            global_descriptor=g.astype(np.float32),
            keypoints=np.stack([x, y], axis=1).astype(np.float32).reshape(-1, 2),
            local_descriptors=l2_normalize(desc, axis=1) if n else desc,
            scores=scores.astype(np.float32),
            image_size=(ow, oh),
            model_id=self.model_id,
            scales=fscales.astype(np.float32),
        )

    def extract_batch(self, images: list[LoadedImage]) -> list[Features]:
        return [self.extract(im) for im in images]

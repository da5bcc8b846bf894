"""The ASMK inverted file (delg_geo/index/asmk.py): codebook, aggregation, the bucketed build, search,
and what the index, the shortlist and the scale benchmark do with it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from delg_geo.index.asmk import Codebook, InvertedFile, aggregate, kernel, similarity
from index_builder.inverted_file import InvertedFileWriter

from _tiny_index import tiny_geo  # noqa: F401  (session fixture; skips without ../shared)

REPO = Path(__file__).resolve().parents[1]


def _clusters(rng, n_centres=40, per=50, dim=16, spread=0.05):
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32)
    return centres, (np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_centres * per, dim))).astype(np.float32)


def test_codebook_assigns_the_nearest_word_of_the_nearest_cell():
    rng = np.random.default_rng(0)
    _, x = _clusters(rng)
    cb = Codebook.fit(x, coarse=8, fine=16, seed=0)
    assert len(cb.coarse) == 8 and cb.cell_start[-1] == cb.size and cb.size <= 8 * 16
    assert cb.size > 64  # cells split into several words each
    again = Codebook.fit(x, coarse=8, fine=16, seed=0)
    np.testing.assert_array_equal(cb.fine, again.fine)  # seeded: the same codebook every run
    q = rng.standard_normal((300, 16)).astype(np.float32)
    w = cb.assign(q)
    cell = np.argmin(((q[:, None] - cb.coarse[None]) ** 2).sum(-1), axis=1)
    for i in range(len(q)):
        a, b = cb.cell_start[cell[i]], cb.cell_start[cell[i] + 1]
        assert a <= w[i] < b
        assert w[i] == a + np.argmin(((cb.fine[a:b] - q[i]) ** 2).sum(-1))


def test_codebook_of_few_points_still_has_words():
    x = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    cb = Codebook.fit(x, coarse=256, fine=64)
    assert len(cb.coarse) == 1 and 1 <= cb.size <= 30 // 8
    assert set(cb.assign(x)) <= set(range(cb.size))


def test_aggregate_sums_residuals_of_a_shared_word():
    cb = Codebook(np.zeros((1, 4), np.float32), np.array([[0, 0, 0, 0], [10, 10, 10, 10]], np.float32), np.array([0, 2]))
    x = np.array([[1, -1, 2, -3], [2, 3, -1, -1], [11, 9, 10.5, 9.5]], np.float32)
    img, words, sigs = aggregate(cb, x)
    np.testing.assert_array_equal(img, [0, 0])
    np.testing.assert_array_equal(words, [0, 1])
    # word 0: (1,-1,2,-3) + (2,3,-1,-1) = (3,2,1,-4) -> bits 1110; word 1: residual (1,-1,.5,-.5) -> 1010
    np.testing.assert_array_equal(np.unpackbits(sigs, axis=1)[:, :4], [[1, 1, 1, 0], [1, 0, 1, 0]])
    # per image: the same descriptors in two images give an entry per (image, word)
    img2, words2, _ = aggregate(cb, np.concatenate([x, x]), image=np.array([0, 0, 0, 1, 1, 1]))
    np.testing.assert_array_equal(img2, [0, 0, 1, 1])
    np.testing.assert_array_equal(words2, [0, 1, 0, 1])


def test_similarity_and_selective_kernel():
    a = np.packbits(np.array([[1, 1, 1, 1, 0, 0, 0, 0]], np.uint8), axis=1)
    b = np.packbits(np.array([[1, 1, 1, 0, 0, 0, 0, 1]], np.uint8), axis=1)
    h = similarity(a, b, 8)
    assert h[0] == pytest.approx(0.5)  # 2 of 8 bits differ
    np.testing.assert_allclose(kernel(np.array([1.0, 0.5, 0.0, -0.5]), 3.0, 0.0), [1.0, 0.125, 0.0, 0.0])


def _brute_scores(cb, images, q, alpha=3.0, tau=0.0):
    """Every image's ASMK score, computed directly (no inverted file)."""
    _, qw, qs = aggregate(cb, q)
    out = np.zeros(len(images))
    for i, x in enumerate(images):
        _, w, s = aggregate(cb, x)
        common, ia, ib = np.intersect1d(qw, w, return_indices=True)
        h = similarity(qs[ia], s[ib], cb.dim)
        out[i] = kernel(h, alpha, tau).sum() / np.sqrt(len(qw) * len(w))
    return out


@pytest.mark.parametrize("batch", [None, 1, 50])
def test_inverted_file_matches_brute_force_and_finds_the_same_place(tmp_path, monkeypatch, batch):
    """Whether a search scores its lists one at a time (batch 1: every list alone), a few at a
    time, or all in one batch (the default here), it gives the brute-force scores."""
    if batch is not None:
        import delg_geo.index.asmk as asmk_module

        monkeypatch.setattr(asmk_module, "BATCH_ENTRIES", batch)
    rng = np.random.default_rng(2)
    centres, x = _clusters(rng, n_centres=60, per=30, dim=16)
    cb = Codebook.fit(x, coarse=8, fine=16, seed=0)
    # 40 images of 30 features; image 2k+1 shows the same "place" as 2k (its features jittered)
    images = []
    for k in range(20):
        base = centres[rng.choice(len(centres), 30)] + 0.2 * rng.standard_normal((30, 16)).astype(np.float32)
        images += [base, base + 0.03 * rng.standard_normal(base.shape).astype(np.float32)]
    w = InvertedFileWriter(tmp_path, cb, buckets=7)
    counts = np.array([len(im) for im in images])
    w.add(counts[:13], np.concatenate(images[:13]))  # two parts, as a build streams them
    w.add(counts[13:], np.concatenate(images[13:]))
    info = w.finish()
    assert not (tmp_path / "asmk.tmp").exists()
    assert info["entries"] == int(np.load(tmp_path / "asmk_counts.npy").astype(np.int64).sum())
    inv = InvertedFile(tmp_path, len(images), info)
    ids_sorted = np.load(tmp_path / "asmk_ids.npy")
    off = np.load(tmp_path / "asmk_offsets.npy")
    for a, b in zip(off[:-1], off[1:]):  # ids increase within every word's list
        assert np.all(np.diff(ids_sorted[a:b].astype(np.int64)) > 0)
    for qi in (0, 5, 17, 33):
        ids, scores = inv.search(images[qi], k=40)
        brute = _brute_scores(cb, images, images[qi])
        np.testing.assert_allclose(scores, brute[ids], rtol=1e-5)
        assert set(ids) == set(np.flatnonzero(brute > 0))
        assert ids[0] == qi and scores[0] == pytest.approx(1.0)  # itself: every word agrees
        twin = qi + 1 if qi % 2 == 0 else qi - 1
        assert ids[1] == twin  # then the other photo of the same place
        ids_x, _ = inv.search(images[qi], k=3, exclude=np.array([qi]))
        assert qi not in ids_x and ids_x[0] == twin and len(ids_x) == 3
        top5 = inv.search(images[qi], k=5)[1]  # the best 5 by normalised score (ties may come in any order)
        np.testing.assert_allclose(top5, np.sort(brute)[::-1][:5], rtol=1e-5)


def test_inverted_file_refuses_mismatched_arrays(tmp_path):
    from delg_geo.core.errors import IndexFormatError

    rng = np.random.default_rng(3)
    _, x = _clusters(rng, n_centres=10, per=20, dim=8)
    cb = Codebook.fit(x, coarse=2, fine=8)
    w = InvertedFileWriter(tmp_path, cb)
    w.add(np.array([100, 100]), x)
    info = w.finish()
    with pytest.raises(IndexFormatError, match="asmk_offsets.npy"):
        InvertedFile(tmp_path, 3, info)  # the index says 3 images, the file holds 2


def test_tiny_index_has_an_inverted_file_and_the_shortlist_adds_its_candidates(tiny_geo):
    from delg_geo.retrieval.search import shortlist

    index = tiny_geo[0].index
    m = index.manifest
    assert m.asmk["kind"] == "asmk-binary" and m.asmk["entries"] > 0
    assert all(name in m.files for name in ("asmk_ids.npy", "asmk_sigs.npy", "asmk_offsets.npy", "asmk_counts.npy"))
    assert index.asmk is not None and len(index.asmk.counts) == len(index)
    i = 3
    kp, desc = index.local_features(i)
    qw = np.asarray(index.global_vectors[i : i + 1], np.float32)
    c = shortlist(index, qw, desc, 1, 5)
    assert len(c.ids) == len(set(c.ids.tolist())) > 1  # the global top-1, then distinct ASMK additions
    np.testing.assert_allclose(c.similarities, index.global_rows(c.ids) @ qw[0], rtol=1e-5, atol=1e-6)
    only_global = shortlist(index, qw, desc, 1, 0)
    assert len(only_global.ids) == 1 and only_global.ids[0] == c.ids[0]
    left_out = shortlist(index, qw, desc, 2, 5, exclude=np.array([i]))
    assert i not in left_out.ids


def test_index_compact_adds_the_inverted_file_and_index_add_keeps_the_bases_choice(tmp_path):
    import shutil

    from delg_geo.index.geo_index import GeoIndex, read_manifest
    from index_builder.assemble import CompactOptions, ModelInfo, assemble_index, compact_index

    from _fake_extractor import FakeExtractor

    rng = np.random.default_rng(4)
    import pandas as pd

    from index_builder.assemble import Part

    n = 40

    def part():
        md = pd.DataFrame(dict(image=[f"p{i}.jpg" for i in range(n)], path=[f"p{i}.jpg" for i in range(n)],
                               lat=np.linspace(45, 45.1, n), lon=np.linspace(12, 12.1, n), width=640, height=480))
        counts = np.full(n, 60)
        return Part(metadata=md, counts=counts, keypoints=rng.uniform(0, 400, (counts.sum(), 2)),
                    global_raw=rng.standard_normal((n, 16)).astype(np.float32),
                    descriptors=rng.standard_normal((counts.sum(), 8)).astype(np.float32))

    p = part()
    model = ModelInfo.of(FakeExtractor())
    plain = tmp_path / "plain"
    assemble_index(plain, [lambda: p], model, options=CompactOptions(asmk=False, local_dim=None), log=lambda s: None)
    assert read_manifest(plain).asmk == {} and GeoIndex(plain).asmk is None
    up = tmp_path / "upgraded"
    m = compact_index(plain, up, log=lambda s: None)
    assert m.asmk["entries"] > 0 and GeoIndex(up).asmk is not None
    for name in ("global.npy", "local_codes.npy", "local_keypoints.npy", "local_offsets.npy"):
        np.testing.assert_array_equal(np.load(plain / name), np.load(up / name))
    # built directly with the inverted file: the same entries, since the codebook is fitted on the same codes
    direct = tmp_path / "direct"
    assemble_index(direct, [lambda: p], model, options=CompactOptions(local_dim=None), log=lambda s: None)
    assert read_manifest(direct).asmk["entries"] == m.asmk["entries"]
    for name in ("asmk_ids.npy", "asmk_sigs.npy", "asmk_offsets.npy", "asmk_counts.npy"):
        np.testing.assert_array_equal(np.load(direct / name), np.load(up / name), err_msg=name)
    # index add keeps what the base has: no inverted file stays none, one stays with its codebook
    def more():
        q = part()
        q.metadata["image"] = q.metadata["path"] = [f"q{i}.jpg" for i in range(n)]
        return q

    plain_m = read_manifest(plain)
    added = assemble_index(plain, [more], model, options=CompactOptions(local_dim=None), base=plain, log=lambda s: None)
    assert added.num_images == 2 * n and added.asmk == {} and GeoIndex(plain).asmk is None
    up_codebook = np.load(up / "asmk_codebook.npz")["fine"]
    added = assemble_index(up, [more], model, options=CompactOptions(local_dim=None), base=up, log=lambda s: None)
    assert added.num_images == 2 * n and added.asmk["entries"] > m.asmk["entries"]
    np.testing.assert_array_equal(np.load(up / "asmk_codebook.npz")["fine"], up_codebook)
    assert len(GeoIndex(up).asmk.counts) == 2 * n and plain_m.num_images == n
    shutil.rmtree(plain)


def test_bench_scale_distractor_entries_are_what_a_build_computes(tmp_path, tiny_geo):
    """Distractors' precomputed entries equal aggregate() of their decoded codes."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench_scale

    cells = bench_scale.read_cells(bench_scale.DEFAULT_CELLS) if bench_scale.DEFAULT_CELLS.exists() else None
    if cells is None:
        import pandas as pd

        cells = pd.DataFrame(dict(hex_id=["47"], imgs_per_cell=[1], latitude_mean=[45.4], longitude_mean=[12.3], edge_km=[10.0]))
    gen = bench_scale.Distractors(tiny_geo[0].index.path, cells, n=30, chunk=30, seed=0, local=True, pool=5000)
    assert gen.codebook is not None
    p = gen.part(0)
    img, words, sigs = p.asmk_entries
    counts = np.asarray(p.counts)
    want = aggregate(gen.codebook, gen.codec.decode(p.local_codes), image=np.repeat(np.arange(len(counts)), counts))
    np.testing.assert_array_equal(img, want[0])
    np.testing.assert_array_equal(words, want[1])
    np.testing.assert_array_equal(sigs, want[2])


def test_codebook_grows_with_the_collection():
    from index_builder.assemble import CompactOptions, asmk_sample_size, asmk_words_for, fit_codebook

    o = CompactOptions()
    assert asmk_words_for(1898, 500, o) == 16_384  # Venice: the measured setting
    assert asmk_words_for(1_001_898, 500, o) == 56_356  # about 8,000 entries a list at a million
    assert asmk_words_for(5_000_000, 500, o) == 262_144  # capped
    assert asmk_words_for(None, 500, o) == 16_384
    assert asmk_words_for(10**6, 500, CompactOptions(asmk_words=4096)) == 4096
    assert asmk_sample_size(16_384, o) == 200_000 and asmk_sample_size(56_356, o) == 450_848
    assert asmk_sample_size(262_144, o) == 2_000_000
    # a small sample limits the words: at least 8 training descriptors each
    x = np.random.default_rng(6).standard_normal((20_000, 8)).astype(np.float32)
    cb = fit_codebook(x, 56_356, o, log=lambda s: None)
    assert cb.size <= 20_000 // 8 and len(cb.coarse) <= 256


def test_a_query_verifies_the_inverted_files_candidates_too(tiny_geo):
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

    geo, ref, venice = tiny_geo
    photo = venice / ref.image[4]
    both = Geolocator(geo.index, geo.extractor, LocateConfig(top_k=3, local_top_k=5, places=False)).locate(photo)
    only = Geolocator(geo.index, geo.extractor, LocateConfig(top_k=3, local_top_k=0, places=False)).locate(photo)
    assert only.candidates == 3 and 3 < both.candidates <= 8
    assert both.to_dict()["candidates"] == both.candidates  # in the JSON a query prints
    default = Geolocator(geo.index, geo.extractor, LocateConfig(top_k=3, places=False))
    assert default.config.local_top_k == 3  # as many as the global top-k unless told


def test_shortlist_recall_tool_counts_where_the_right_photo_ranks(tiny_geo):
    """tools/shortlist_recall.py on the tiny index: with every photo returned, every right photo
    is found; recall only grows with k, under every kernel tried."""
    sys.path.insert(0, str(REPO / "tools"))
    import shortlist_recall as sr

    assert sr.first_rank(np.array([5, 3, 9]), np.array([9, 3])) == 1
    assert sr.first_rank(np.array([5, 3]), np.array([7])) == 2
    geo, _, _ = tiny_geo
    n = len(geo.index)
    res = sr.recall(geo.index.path, sample=n, radius_km=2.0, ks=(1, 5, n), kernels=[(3.0, 0.0), (3.0, 0.99)],
                    top_k=n, local_top_k=0)
    assert res["images"] == n and 5 <= res["with_a_right_photo"] <= res["sampled"] <= n
    g = res["recall"]["global"]
    assert g["top1"] <= g["top5"] <= g[f"top{n}"] == 1.0  # exact search returns every other photo
    assert res["recall"]["shortlist"]["in_shortlist"] == 1.0  # the shortlist holds every photo
    own, strict = res["recall"]["asmk a=3 t=0"], res["recall"]["asmk a=3 t=0.99"]
    assert own["top1"] <= own["top5"] <= own[f"top{n}"]
    assert strict["top1"] <= strict["top5"] <= strict[f"top{n}"]
    few = sr.recall(geo.index.path, sample=n, radius_km=2.0, first=8, ks=(n,))
    assert few["first"] == 8 and few["sampled"] <= 8
    with pytest.raises(SystemExit):
        sr.main(["--index", str(geo.index.path), "--kernel", "3"])
    with pytest.raises(SystemExit):
        sr.main(["--index", str(geo.index.path), "--k", "1,ten"])

"""The compact index: local codecs of any dimension, uint16 keypoints, streaming assembly,
IVF-PQ above the exact limit, format-1 indexes still read and convertible, unknown formats refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from delg_geo.core.errors import IndexFormatError
from delg_geo.features.base import l2_normalize
from delg_geo.index.geo_index import GeoIndex, read_manifest
from delg_geo.index.store import LocalCodec, decode_keypoints, encode_keypoints, fit_local_codec, keypoint_unit
from index_builder.assemble import CompactOptions, ModelInfo, NpyAppender, Part, assemble_index, compact_index


def _clustered(rng, n, d, k=20, noise=0.3):
    """Unit vectors around ``k`` random centres: structure a codec can learn (like real descriptors)."""
    centres = rng.normal(size=(k, d))
    return l2_normalize(centres[rng.integers(0, k, n)] + noise * rng.normal(size=(n, d)), axis=1)


@pytest.mark.parametrize("dim", [64, 112, 128])
@pytest.mark.parametrize("kind,out_dim,max_err", [("float16", None, 1e-3), ("pca-int8", 48, 0.25),
                                                  ("pca-binary", None, 1.0), ("pq", 32, 0.45)])
def test_codecs_round_trip_for_any_dimension(tmp_path, dim, kind, out_dim, max_err):
    rng = np.random.default_rng(0)
    x = _clustered(rng, 6000, dim)
    codec = fit_local_codec(x[:5000], kind, out_dim, pq_m=8 if kind == "pq" else None)
    codes = codec.encode(x[5000:])
    assert codes.shape == (1000, codec.code_width) and codes.dtype == codec.code_dtype
    assert codes.nbytes == 1000 * codec.bytes_per_feature
    codec.save(tmp_path / "c.npz")
    again = LocalCodec.load(tmp_path / "c.npz")
    dec = again.decode(codes)
    proj = again.project(x[5000:])
    assert dec.shape == proj.shape == (1000, again.dim)
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=1e-5)
    err = np.linalg.norm(dec - proj, axis=1)
    assert np.median(err) < max_err, np.median(err)
    # matching survives: each decoded code's nearest projected query is itself for most rows
    nn = np.argmax(dec @ proj.T, axis=1)
    assert (nn == np.arange(1000)).mean() > (0.99 if kind == "float16" else 0.3)


def test_keypoints_in_uint16_units():
    kp = np.array([[0.0, 0.0], [511.6, 383.4], [70000.0, 12.0]])
    assert keypoint_unit(640, 480) == 1 and keypoint_unit(70000, 10) == 2
    c = encode_keypoints(kp[:2], 1)
    assert c.dtype == np.uint16 and c.tolist() == [[0, 0], [512, 383]]
    big = decode_keypoints(encode_keypoints(kp, 2), 2)
    assert np.abs(big - kp).max() <= 1.0


def test_npy_appender_writes_a_normal_npy(tmp_path):
    a = NpyAppender(tmp_path / "x.npy", np.int8, 3)
    a.append(np.ones((2, 3)))
    a.append(np.full((5, 3), -2))
    a.close()
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert x.shape == (7, 3) and x.dtype == np.int8 and x[-1, 0] == -2
    with pytest.raises(ValueError):
        NpyAppender(tmp_path / "y.npy", np.int8, 3).append(np.ones((1, 4)))


def _parts(rng, n_parts, per_part, gdim=64, ldim=40, feats=30):
    centres = rng.normal(size=(8, gdim))
    parts = []
    for p in range(n_parts):
        counts = rng.integers(feats // 2, feats + 1, per_part)
        m = int(counts.sum())
        g = centres[rng.integers(0, 8, per_part)] + 0.5 * rng.normal(size=(per_part, gdim))
        md = pd.DataFrame(dict(image=[f"img{p}_{i}.jpg" for i in range(per_part)],
                               path=[f"/x/img{p}_{i}.jpg" for i in range(per_part)],
                               lat=rng.uniform(45.4, 45.5, per_part), lon=rng.uniform(12.3, 12.4, per_part),
                               width=640, height=480))
        parts.append(Part(metadata=md, counts=counts, keypoints=rng.uniform(0, 479, (m, 2)),
                          global_raw=l2_normalize(g, axis=1), descriptors=_clustered(rng, m, ldim),
                          scores=rng.uniform(0, 1, m)))
    return parts


def _model(dim=40):
    return ModelInfo("fake", "f" * 64, dim, needs_whitening=True)


def test_assembly_exact_then_ivfpq_and_add(tmp_path):
    rng = np.random.default_rng(1)
    parts = _parts(rng, 6, 100)
    opts = CompactOptions(global_dim=32, local_dim=16, max_local=20, exact_limit=10_000, whitening_min_images=50)
    m = assemble_index(tmp_path / "a", [lambda p=p: p for p in parts], _model(), options=opts, log=lambda s: None)
    assert m.format_version == 2 and m.num_images == 600 and m.index_type == "flat"
    assert m.search["type"] == "flat" and m.local["dim"] == 16 and m.whitening["dim"] == 32
    assert set(m.files) >= {"global.npy", "local_codes.npy", "local_keypoints.npy", "local_codec.npz"}
    assert "global.faiss" not in m.files and "global_raw.npy" not in m.files
    assert m.num_local_features == sum(int(np.minimum(p.counts, 20).sum()) for p in parts)
    idx = GeoIndex(tmp_path / "a", device="cpu")
    # the highest-attention features are the ones kept, in index order
    p0 = parts[0]
    a, b = 0, int(p0.counts[0])
    keep = np.sort(np.argsort(-p0.scores[a:b])[:20])
    kp, desc = idx.local_features(0)
    np.testing.assert_allclose(kp, np.rint(p0.keypoints[keep]), atol=1e-6)
    assert desc.shape == (len(keep), 16)
    # exact search finds an image from its own raw descriptor
    from delg_geo.retrieval.search import search

    assert search(idx, parts[3].global_raw[7], 5)[0].ids[0] == 307

    # the same data past the exact limit: IVF-PQ trained on a sample, exact re-scoring of its top candidates
    opts_ivf = CompactOptions(**{**opts.__dict__, "exact_limit": 100})
    m2 = assemble_index(tmp_path / "b", [lambda p=p: p for p in parts], _model(), options=opts_ivf, log=lambda s: None)
    assert m2.index_type == "ivfpq" and m2.search["nlist"] >= 1 and m2.search["refine"] == 4
    assert "global.faiss" in m2.files
    idx2 = GeoIndex(tmp_path / "b", device="cpu")
    hits = sum(search(idx2, parts[j].global_raw[i], 5)[0].ids[0] == 100 * j + i for j in range(6) for i in range(0, 100, 10))
    assert hits >= 55  # of 60
    # add: the base's codec and whitening encode the new part, its records are copied as they are
    more = _parts(np.random.default_rng(2), 1, 50)
    m3 = assemble_index(tmp_path / "a", [lambda: more[0]], _model(), options=opts, base=tmp_path / "a",
                        sources=[{"added": 50}], log=lambda s: None)
    assert m3.num_images == 650 and len(m3.sources) == 1
    idx3 = GeoIndex(tmp_path / "a", device="cpu")
    np.testing.assert_array_equal(idx3.local_features(5)[1], idx.local_features(5)[1])
    assert search(idx3, more[0].global_raw[3], 3)[0].ids[0] == 603


def _legacy_index(path, rng, n=120, gdim=64, ldim=40, feats=30):
    """A format-1 index as delg-geo wrote it before the compact store."""
    import faiss

    from delg_geo.index.whitening import fit_pca_whitening

    path.mkdir()
    g = l2_normalize(rng.normal(size=(n, gdim)), axis=1).astype(np.float32)
    wh = fit_pca_whitening(g)
    x = wh.apply(g)
    fi = faiss.IndexFlatIP(x.shape[1])
    fi.add(x)
    counts = np.full(n, feats)
    md = pd.DataFrame(dict(id=np.arange(n), image=[f"i{i}.jpg" for i in range(n)], path=[f"/x/i{i}.jpg" for i in range(n)],
                           lat=rng.uniform(45.4, 45.5, n), lon=rng.uniform(12.3, 12.4, n), width=500, height=400))
    md.to_csv(path / "metadata.csv", index=False)
    np.save(path / "global_raw.npy", g)
    faiss.write_index(fi, str(path / "global.faiss"))
    wh.save(path / "whitening.npz")
    np.save(path / "local_offsets.npy", np.concatenate([[0], np.cumsum(counts)]))
    np.save(path / "local_keypoints.npy", rng.uniform(0, 399, (n * feats, 2)).astype(np.float32))
    np.save(path / "local_descriptors.npy", _clustered(rng, n * feats, ldim).astype(np.float16))
    np.save(path / "local_scores.npy", np.linspace(1, 0, n * feats).astype(np.float16))
    pd.DataFrame(columns=["row", "image", "reason"]).to_csv(path / "skipped.csv", index=False)
    names = ["metadata.csv", "global_raw.npy", "global.faiss", "whitening.npz", "local_offsets.npy",
             "local_keypoints.npy", "local_descriptors.npy", "local_scores.npy", "skipped.csv"]
    manifest = dict(model_id="fake", model_fingerprint="f" * 64, global_dim=gdim, search_dim=x.shape[1], local_dim=ldim,
                    num_images=n, num_local_features=n * feats, index_type="flat",
                    whitening=dict(kind="pca", power=0.5, shrinkage=0.0, dim=x.shape[1], fitted_on=n),
                    files={k: (path / k).stat().st_size for k in names}, format_version=1)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return g


def test_format_1_is_read_and_converted(tmp_path):
    from delg_geo.retrieval.search import search

    rng = np.random.default_rng(3)
    g = _legacy_index(tmp_path / "old", rng)
    old = GeoIndex(tmp_path / "old", device="cpu")
    assert old.manifest.format_version == 1
    kp, desc = old.local_features(2)
    assert kp.shape == (30, 2) and desc.shape == (30, 40) and old.query_local(desc).shape == (30, 40)
    assert search(old, g[9], 3)[0].ids[0] == 9
    m = compact_index(tmp_path / "old", tmp_path / "new", CompactOptions(local_dim=16, whitening_min_images=50),
                      log=lambda s: None)
    assert m.format_version == 2 and m.num_images == 120 and "compacted_from" in m.sources[-1]
    new = GeoIndex(tmp_path / "new", device="cpu")
    assert search(new, g[9], 3)[0].ids[0] == 9
    assert new.local_features(2)[1].shape == (30, 16)
    np.testing.assert_allclose(new.local_features(2)[0], np.rint(kp))


def test_unknown_format_is_refused_with_a_message(tmp_path):
    _legacy_index(tmp_path / "idx", np.random.default_rng(4))
    d = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    d["format_version"] = 99
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(IndexFormatError, match="format 99.*upgrade delg-geo"):
        read_manifest(tmp_path / "idx")
    d["format_version"] = 0
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(IndexFormatError, match="rebuild"):
        GeoIndex(tmp_path / "idx")

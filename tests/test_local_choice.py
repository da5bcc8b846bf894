"""``index build --local``: learned local features recorded in the manifest, used for
verification, and a query with other local features refused with a message saying what to pass."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import shared_path

N_REF = 16


@pytest.fixture(scope="module")
def xfeat_index(tmp_path_factory):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app
    from delg_geo.features.models.local_weights import find_weights

    if find_weights("xfeat") is None:
        pytest.skip("the xfeat weights are not installed (`delg-geo model fetch-weights`)")
    venice = shared_path("venice")
    ref = pd.read_csv(venice / "reference.csv")
    sub = ref.iloc[:: len(ref) // N_REF].head(N_REF)
    tmp = tmp_path_factory.mktemp("local_choice")
    sub.to_csv(tmp / "ref.csv", index=False)
    r = CliRunner().invoke(app, ["index", "build", str(venice), "--metadata", str(tmp / "ref.csv"),
                                 "--index", str(tmp / "index"), "--local", "xfeat", "--json"])
    assert r.exit_code == 0, r.output
    return dict(venice=venice, ref=sub.reset_index(drop=True), index=tmp / "index", build=json.loads(r.stdout.splitlines()[-1]))


def test_manifest_records_the_choice(xfeat_index):
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.features.models.local_weights import WEIGHTS

    idx = GeoIndex(xfeat_index["index"])
    m = idx.manifest
    assert m.model_id == "efficientnet-lite0" and m.global_dim == 1280  # the global descriptor stays DELG
    assert m.local_features == "xfeat" and m.local_dim == 64 and len(m.local_fingerprint) == 64
    assert m.local_config == {"top_k": 1024, "max_side": 1024}
    # only the global scales run when the model's own local features are not used
    assert tuple(m.model_config["scales"]) == (0.7071, 1.0, 1.4142)
    counts = np.diff(idx.offsets)
    # the compact store keeps the best 500 of the 1024 keypoints, PCA-projected (generic over the dimension)
    assert m.num_images == N_REF and counts.max() <= 500 and counts.min() > 100
    kp, desc = idx.local_features(0)
    assert desc.shape == (counts[0], m.local["dim"]) and m.local["dim"] <= 64
    w, h = idx.image_size(0)
    assert (kp >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()
    assert WEIGHTS["xfeat"].sha256 not in m.local_fingerprint  # a fingerprint of weights *and* settings


def test_query_verifies_with_xfeat(xfeat_index):
    from delg_geo.retrieval.locate import Geolocator
    from delg_geo.retrieval.verify import VERIFY_DEFAULTS

    geo = Geolocator.from_index(xfeat_index["index"], top_k=5, places=False)
    assert geo.extractor.local_features == "xfeat"
    assert geo.config.verify_config == VERIFY_DEFAULTS["xfeat"]
    row = xfeat_index["ref"].iloc[3]
    p = geo.locate(xfeat_index["venice"] / row.image)
    # the photo itself is in the index: it verifies with far more inliers than anything else
    assert p.method == "verified" and p.neighbour.image == row.image
    assert p.inliers >= 150
    others = [a.inliers for a in p.alternatives]
    assert max(others, default=0) < p.inliers / 4


def test_other_local_features_are_refused(xfeat_index):
    from typer.testing import CliRunner

    from delg_geo.apps.cli import app
    from delg_geo.core.errors import IndexFormatError
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator
    from delg_geo.features.models import get_extractor

    idx = GeoIndex(xfeat_index["index"])
    cfg = Geolocator.from_index(xfeat_index["index"], verify=False).extractor.config
    delg_own = get_extractor(None, config=cfg)  # same global model and settings, DELG local features
    with pytest.raises(IndexFormatError, match="query with --local xfeat"):
        Geolocator(idx, delg_own)
    other_settings = get_extractor(None, config=cfg, local="xfeat", local_options={"top_k": 256})
    with pytest.raises(IndexFormatError, match="other settings"):
        Geolocator(idx, other_settings)
    img = str(xfeat_index["venice"] / xfeat_index["ref"].image[0])
    r = CliRunner().invoke(app, ["query", img, "--index", str(xfeat_index["index"]), "--local", "delg"])
    assert r.exit_code != 0 and "query with --local xfeat" in str(r.exception)


def test_default_local_features_per_model():
    from delg_geo.features.models.local_features import DEFAULT_LOCAL, default_local

    assert DEFAULT_LOCAL == "aliked-n16"
    assert default_local(None) == default_local("efficientnet-lite0") == "aliked-n16"
    # an official DELG model keeps its own local features, trained for landmark matching
    assert default_local("delg-r50-gldv2") == default_local("/models/my-delg") == "delg"


def test_continuing_keeps_the_index_local_features(xfeat_index, tmp_path):
    """Without --local, `index add` and `--resume` keep what the index or the interrupted build
    holds (an index built before the default changed keeps its delg features)."""
    import shutil

    from delg_geo.features.models.local_weights import find_weights
    from index_builder.build import BuildOptions, _default_local, build_index

    new_build = "aliked-n16" if find_weights("aliked-n16") else "delg"  # (delg: see the test below)
    assert _default_local(xfeat_index["index"], None, True) == "xfeat"
    assert _default_local(xfeat_index["index"], None, False) == new_build  # a new build (--overwrite)
    interrupted = tmp_path / "interrupted"
    (interrupted / ".building").mkdir(parents=True)
    (interrupted / ".building" / "state.json").write_text(json.dumps({"local_features": "delg"}))
    assert _default_local(interrupted, None, True) == "delg"
    assert _default_local(tmp_path / "new", None, True) == new_build
    # a real add through the Python API, without naming the local features: not refused
    copy = tmp_path / "copy"
    shutil.copytree(xfeat_index["index"], copy)
    venice = xfeat_index["venice"]
    ref = pd.read_csv(venice / "reference.csv")
    extra = ref[~ref.image.isin(xfeat_index["ref"].image)].head(2)
    extra.to_csv(tmp_path / "extra.csv", index=False)
    rep = build_index(venice, copy, tmp_path / "extra.csv", add=True, options=BuildOptions(progress=False), log=lambda m: None)
    from delg_geo.index.geo_index import read_manifest

    m = read_manifest(copy)
    assert rep.num_images == N_REF + 2 == m.num_images and m.local_features == "xfeat"


def test_aliked_sees_small_photos_enlarged_and_an_index_keeps_its_settings():
    """ALIKED's default settings enlarge a photo to a longest side of 1024 px (keypoints still in
    the photo's own pixels); an index's manifest settings are used as they are, so an index built
    before that default keeps working with its own."""
    from delg_geo.features.images import load_image
    from delg_geo.features.models import get_extractor
    from delg_geo.features.models.local_weights import find_weights

    if find_weights("aliked-n16") is None:
        pytest.skip("the aliked-n16 weights are not installed (`delg-geo model fetch-weights`)")
    venice = shared_path("venice")
    image = load_image(venice / pd.read_csv(venice / "reference.csv").image[0], max_side=1024)
    w, h = image.original_size
    assert max(w, h) < 1024
    enlarged = get_extractor(None, local="aliked-n16")
    assert enlarged.local_config == {"top_k": 1024, "max_side": 1024, "upscale": True}
    as_built = get_extractor(None, local="aliked-n16", local_options={"top_k": 1024, "max_side": 1024})
    assert not as_built.local.upscale and as_built.local_fingerprint != enlarged.local_fingerprint
    kp_big, _, de_big = enlarged.local.extract_batch([image])[0]
    kp_small, _, _ = as_built.local.extract_batch([image])[0]
    for kp in (kp_big, kp_small):
        assert (kp >= -0.5).all() and (kp[:, 0] < w + 0.5).all() and (kp[:, 1] < h + 0.5).all()
    assert len(kp_big) == 1024 and np.allclose(np.linalg.norm(de_big, axis=1), 1, atol=1e-3)
    # the enlarged photo gives other keypoints, not the same ones rescaled
    nearest = np.sqrt(((kp_big[:, None, :] - kp_small[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert np.mean(nearest < 0.25) < 0.8


def test_default_without_its_weights_builds_with_delg(tmp_path, monkeypatch):
    """A build that names no --local keeps working where the ALIKED weights are missing, and says so."""
    import delg_geo.features.models.local_weights as lw
    from index_builder.build import _default_local

    said = []
    monkeypatch.setattr(lw, "find_weights", lambda name: None)
    assert _default_local(tmp_path / "new", None, False, said.append) == "delg"
    assert len(said) == 1 and "aliked-n16 weights" in said[0] and "fetch-weights" in said[0]
    monkeypatch.setattr(lw, "find_weights", lambda name: tmp_path / "found.pth")
    assert _default_local(tmp_path / "new", None, False, said.append) == "aliked-n16" and len(said) == 1

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

    from delg_geo.cli import app
    from delg_geo.models.local_weights import find_weights

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
    from delg_geo.index import GeoIndex
    from delg_geo.models.local_weights import WEIGHTS

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
    from delg_geo.locate import Geolocator
    from delg_geo.verify import VERIFY_DEFAULTS

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

    from delg_geo.cli import app
    from delg_geo.errors import IndexFormatError
    from delg_geo.index import GeoIndex
    from delg_geo.locate import Geolocator
    from delg_geo.models import get_extractor

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

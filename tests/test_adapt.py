"""``delg-geo index adapt`` on a tiny real index: the Lund street photos, one Berlin photo, seven
photos of Piazza San Marco and ten Venice photos from elsewhere (26 photos, three scales, the
model's own local features: the build takes about a minute on two cores).

* Mining finds the places a hand check confirms: the eight Lund photos, taken a few metres apart
  along one street, are one place; the two photos of St Mark's west façade (upper lunettes, and
  the central portal under the same balcony) verify each other; the Berlin photo is in no place.
* Training lowers the loss, and the adapted index's self-query recall is at least the plain one's.
* Damaged or swapped adapted weights are refused, naming the file.
* Ray mining gives the same shards, byte for byte, as one process.
* A killed adapt (SIGKILL while mining, training, re-extracting, before and during the move into
  place) leaves an index that opens, answers and passes ``index verify``, and a rerun completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, shared_path

SCALES = (0.7071, 1.0, 1.4142)
SAN_MARCO = (45.434261, 12.338961)
FACADE = ("venice/images/49766422178.jpg", "venice/images/49772230107.jpg")  # checked by eye: St Mark's west façade
LUND = [f"exif_gps/lund/{k:02d}.jpg" for k in range(1, 9)]


def _collection(root: Path) -> Path:
    from delg_geo.core.geo import haversine_km

    data = shared_path("venice").parent
    shared_path("exif_gps")
    ref = pd.read_csv(data / "venice" / "reference.csv")
    d = haversine_km(*SAN_MARCO, ref.lat.to_numpy(), ref.lon.to_numpy())
    near = ref[d < 0.05].sort_values("flickr_photo_id").iloc[::7].head(14)
    far = ref[d > 1.0].iloc[::170].head(10)
    v = pd.concat([near, far])
    rows = [dict(image="venice/" + im, lat=a, lon=b) for im, a, b in zip(v.image, v.lat, v.lon)]
    e = pd.read_csv(data / "exif_gps" / "metadata.csv")
    rows += [dict(image="exif_gps/" + im, lat=a, lon=b) for im, a, b in zip(e.image, e.lat, e.lon)]
    csv = root / "tiny.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The tiny index, built once; tests adapt copies of it."""
    from delg_geo.features.models.lite_delg import LiteDelgExtractor
    from index_builder.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("adapt")
    csv = _collection(root)
    build_index(shared_path("venice").parent, root / "plain", csv, extractor=LiteDelgExtractor(scales=SCALES),
                options=BuildOptions(progress=False), log=lambda m: None)
    return root / "plain"


def _copy(plain: Path, dst: Path) -> Path:
    shutil.copytree(plain, dst, ignore=shutil.ignore_patterns(".writer.lock", ".swap.lock"))
    return dst


def _options(**kw):
    from index_builder.adapt import AdaptOptions
    from index_builder.adapt_train import TrainConfig

    return AdaptOptions(epochs=kw.pop("epochs", 2), min_places=2, shard_size=8, progress=False,
                        train=TrainConfig(tuples_per_epoch=32, batch=4, lr=1e-4), **kw)


@pytest.fixture(scope="module")
def adapted(plain, tmp_path_factory):
    from index_builder.adapt import adapt_index

    idx = _copy(plain, tmp_path_factory.mktemp("adapted") / "index")
    rep = adapt_index(idx, _options(), log=lambda m: None)
    return idx, rep


def test_mining_finds_the_places_a_hand_check_confirms(plain):
    from delg_geo.core.geo import haversine_km
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.mining import MiningConfig, mine_photos, mined_set, require_places, resolve

    idx = GeoIndex(plain, device="cpu")
    cfg = resolve(idx, MiningConfig())
    assert (cfg.radius_km, cfg.min_inliers) == (0.1, 15)  # the index's confidence radius and its type's threshold
    rows = mine_photos(idx, np.arange(len(idx)), cfg)
    found = mined_set(rows, idx.lats, idx.lons, cfg)
    names = idx.metadata.image.tolist()
    at = {n: i for i, n in enumerate(names)}
    lund = found.places[[at[n] for n in LUND]]
    assert lund[0] >= 0 and (lund == lund[0]).all()  # one place: the whole street
    assert set(np.flatnonzero(found.places == lund[0])) == {at[n] for n in LUND}  # and nothing else
    assert found.places[at["exif_gps/berlin/01.jpg"]] == -1
    a, b = sorted(at[n] for n in FACADE)
    assert [a, b] in found.positives.tolist()
    assert 2 <= found.num_places <= 4 and 10 <= found.counts()["photos_in_places"] <= 16
    p = found.positives
    assert (haversine_km(idx.lats[p[:, 0]], idx.lons[p[:, 0]], idx.lats[p[:, 1]], idx.lons[p[:, 1]]) <= 0.1).all()
    assert (found.positive_inliers >= 15).all()
    n = found.negatives
    assert len(n) and (haversine_km(idx.lats[n[:, 0]], idx.lons[n[:, 0]], idx.lats[n[:, 1]], idx.lons[n[:, 1]]) >= 0.3).all()
    require_places(found, 2)
    from delg_geo.core.errors import DelgGeoError

    with pytest.raises(DelgGeoError, match=rf"mining found {found.num_places} place\(s\).*at least 20 are needed"):
        require_places(found)


def test_a_collection_too_sparse_is_refused_in_one_line(plain, tmp_path):
    from delg_geo.core.errors import DelgGeoError
    from index_builder.adapt import adapt_index

    idx = _copy(plain, tmp_path / "index")
    opts = _options()
    opts.min_places = 20
    with pytest.raises(DelgGeoError) as e:
        adapt_index(idx, opts, log=lambda m: None)
    assert "\n" not in str(e.value) and "place(s)" in str(e.value) and "at least 20 are needed" in str(e.value)
    assert json.loads((idx / "manifest.json").read_text()).get("adapt") in (None, {})


def test_training_lowers_the_loss_and_recall_holds(adapted):
    from delg_geo.index.check import verify_index
    from delg_geo.index.geo_index import read_manifest
    from delg_geo.retrieval.locate import Geolocator

    idx, rep = adapted
    losses = [e["loss"] for e in rep.epochs[1:]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    s = rep.selfquery
    assert rep.installed and s["queries"] >= 10
    assert s["after"]["top1"] >= s["before"]["top1"] and s["after"]["top10"] >= s["before"]["top10"]
    m = read_manifest(idx)
    assert m.adapt["kind"] == "finetune" and m.adapt["epochs"] == 2 and m.adapt["mined"]["places"] >= 2
    assert "adapt.npz" in m.files and "adapt.npz" in m.checksums
    rep_v = verify_index(idx)
    assert rep_v["ok"] and "adapted weights" in rep_v["checked"], rep_v["problems"]
    geo = Geolocator.from_index(idx, device="cpu")  # the adapted descriptor, loaded from the index
    assert geo.extractor.fingerprint == m.model_fingerprint
    pred = geo.locate(shared_path("exif_gps", "lund", "05.jpg"))
    assert pred.method == "verified" and pred.neighbour.image.startswith("exif_gps/lund/")


def _rewrite_listing(idx: Path, name: str) -> None:
    """Record ``name``'s size, checksum and stamp in the manifest: a swap that the file checks pass."""
    from delg_geo.index.crosscheck import file_stamp
    from delg_geo.index.integrity import file_checksum

    d = json.loads((idx / "manifest.json").read_text())
    d["files"][name] = (idx / name).stat().st_size
    d["checksums"][name] = file_checksum(idx / name)
    if "stamps" in d:
        d["stamps"][name] = file_stamp(idx / name, d.get("build_id", ""))
    (idx / "manifest.json").write_text(json.dumps(d, indent=2))


@pytest.mark.parametrize("how", ["damaged", "swapped"])
def test_damaged_or_swapped_weights_are_refused(adapted, tmp_path, how):
    from delg_geo.core.errors import IndexFormatError
    from delg_geo.features.models.adapted import AdaptedWeights
    from delg_geo.index.check import verify_index
    from delg_geo.retrieval.locate import Geolocator

    idx = _copy(adapted[0], tmp_path / "index")
    f = idx / "adapt.npz"
    if how == "damaged":
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
        why = "content does not match its checksum"
    else:  # another index's weights (slightly other ones), listed as if they were this index's own
        w = AdaptedWeights.load(f)
        w.layers["head/bias"] = w.layers["head/bias"] + 0.01
        w.save(f)
        _rewrite_listing(idx, "adapt.npz")
        why = "holds other weights"
    with pytest.raises(IndexFormatError, match=f"adapt.npz {why}"):
        Geolocator.from_index(idx, device="cpu")
    rep = verify_index(idx)
    assert not rep["ok"] and any("adapt.npz" in p and why in p for p in rep["problems"]), rep["problems"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_mining_gives_the_same_pairs(plain, tmp_path, ray_cluster):
    from delg_geo.core.ray_pool import RayOptions
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.calibrate import photo_keys
    from delg_geo.retrieval.mining import MinedRows, MiningConfig, mined_set, resolve
    from index_builder.adapt_work import MineWorker, load_shards, mine_shard, plan_shards, run_shards_here_or_on_ray

    idx = GeoIndex(plain, device="cpu")
    cfg = resolve(idx, MiningConfig())
    keys = photo_keys(idx.metadata)
    shards = plan_shards(np.arange(len(idx)), 8)
    out = {}
    for where, ray in (("here", None), ("ray", RayOptions(workers=2))):
        info = run_shards_here_or_on_ray(tmp_path / where, shards, lambda s: mine_shard(idx, s.ids, cfg, keys), MineWorker,
                                         (str(plain), cfg), "mine", ray, "mine", "adapt-mine", log=lambda m: None)
        assert info["ray"] == (ray is not None) and info["shards"] == len(shards) == 4
        out[where] = load_shards(tmp_path / where, shards)
    for a, b in zip(out["here"], out["ray"]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fields = ("query_ids", "offsets", "ids", "similarities", "inliers")
    sets = [mined_set(MinedRows.concat([MinedRows(**{k: d[k] for k in fields}) for d in out[w]]), idx.lats, idx.lons, cfg)
            for w in ("here", "ray")]
    np.testing.assert_array_equal(sets[0].positives, sets[1].positives)
    np.testing.assert_array_equal(sets[0].places, sets[1].places)


_ADAPT_SCRIPT = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from test_adapt import _options
from index_builder.adapt import adapt_index
adapt_index({index!r}, _options(), log=lambda m: None)
"""


def _killed(index: Path, point: str) -> None:
    code = _ADAPT_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), index=str(index))
    env = dict(os.environ, DELG_GEO_TEST_KILL_AT=point)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])  # it really was killed there


def _as_it_was(index: Path, plain_manifest: dict) -> None:
    from delg_geo.index.check import verify_index
    from delg_geo.index.geo_index import GeoIndex

    m = json.loads((index / "manifest.json").read_text())
    assert not m.get("adapt") and m["files"] == plain_manifest["files"] and m["checksums"] == plain_manifest["checksums"]
    assert len(GeoIndex(index, device="cpu")) == plain_manifest["num_images"]
    assert verify_index(index)["ok"]


def test_a_killed_adapt_leaves_the_index_whole_and_a_rerun_completes(plain, tmp_path):
    from delg_geo.core.errors import IndexFormatError
    from delg_geo.index.check import verify_index
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator
    from index_builder.adapt import adapt_index

    idx = _copy(plain, tmp_path / "index")
    before = json.loads((idx / "manifest.json").read_text())
    for point in ("adapt-mine", "adapt-cache", "adapt-epoch", "adapt-extract", "adapt-staged"):
        _killed(idx, point)  # each run resumes the work the previous one saved, then is killed further on
        _as_it_was(idx, before)
        if point == "adapt-mine":
            pred = Geolocator.from_index(idx, device="cpu").locate(shared_path("exif_gps", "lund", "05.jpg"))
            assert pred.method == "verified"
    saved = {p.name for p in (idx / ".adapt").iterdir()}
    assert {"mining", "cache", "train", "extract", "next", "state.json"} <= saved
    _killed(idx, "swap")  # while the adapted files are moved into place: the index is not whole until a rerun
    with pytest.raises(IndexFormatError, match="an interrupted adapt"):
        GeoIndex(idx, device="cpu")
    rep = adapt_index(idx, _options(), log=lambda m: None)
    assert rep.installed and rep.resumed["mining_shards"] == 4 and rep.resumed["epochs"] == 2
    assert not (idx / ".adapt").exists()
    assert verify_index(idx)["ok"]
    m = json.loads((idx / "manifest.json").read_text())
    assert m["adapt"]["kind"] == "finetune" and m["model_fingerprint"] != before["model_fingerprint"]
    pred = Geolocator.from_index(idx, device="cpu").locate(shared_path("exif_gps", "lund", "05.jpg"))
    assert pred.method == "verified" and pred.neighbour.image.startswith("exif_gps/lund/")

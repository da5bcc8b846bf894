"""Hostile input and damaged indexes (issue 11): every case asserts the exit code (or the error),
the message, and that nothing was lost (the index still opens and answers the same, the skipped
file is listed, nothing half-written).

The indexes here are tiny: real Lund photos (../shared/data/exif_gps) with a three-scale
extractor, so each build takes a few seconds on two cores.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _fake_extractor import fake_collection
from conftest import REPO, shared_path

SCALES = (0.7071, 1.0, 1.4142)


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def small_extractor():
    from delg_geo.features.models.lite_delg import LiteDelgExtractor

    return LiteDelgExtractor(scales=SCALES)


def lund(n: int = 3) -> list[Path]:
    d = shared_path("exif_gps", "lund")
    return sorted(d.glob("*.jpg"))[:n]


def make_collection(root: Path, n: int = 3) -> tuple[Path, Path]:
    """``root/images`` with ``n`` Lund photos (EXIF GPS kept) and ``root/ref.csv`` listing them."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for p in lund(n):
        shutil.copy(p, images / p.name)
        from delg_geo.features.exif import read_exif_gps

        lat, lon = read_exif_gps(p)
        rows.append(dict(image=p.name, lat=lat, lon=lon))
    csv = root / "ref.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return images, csv


def build(images, index, csv=None, extractor=None, **kw):
    from index_builder.build import BuildOptions, build_index

    logs: list[str] = []
    opts = kw.pop("options", None) or BuildOptions(progress=False)
    rep = build_index(images, index, csv, extractor=extractor, options=opts, log=logs.append, **kw)
    return rep, logs


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``delg-geo ARGS`` in this process, through ``main()`` (as the installed script runs it)."""
    from delg_geo.apps.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["delg-geo", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_extractor):
    """A complete 3-photo index, built once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("hostile")
    images, csv = make_collection(root)
    rep, _ = build(images, root / "index", csv, small_extractor)
    assert rep.num_images == 3
    return dict(root=root, images=images, csv=csv, index=root / "index")


def copy_index(tiny, tmp_path) -> Path:
    dst = tmp_path / "index"
    shutil.copytree(tiny["index"], dst)
    return dst


def answers(index_dir, image, extractor) -> tuple[float, float, int]:
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

    geo = Geolocator(GeoIndex(index_dir), extractor, LocateConfig(top_k=3, places=False))
    p = geo.locate(image)
    return round(p.lat, 6), round(p.lon, 6), p.neighbour.id


# -- 1. security -------------------------------------------------------------------------------------

def _links(images: Path, outside: Path) -> None:
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(lund(4)[3], outside / "04.jpg")
    (images / "passwd.jpg").symlink_to("/etc/passwd")
    (images / "out.jpg").symlink_to(outside / "04.jpg")
    (images / "outdir").symlink_to(outside, target_is_directory=True)


def test_symlinks_escaping_the_images_folder_are_skipped(tmp_path, small_extractor):
    from index_builder.sources import OUTSIDE_REASON

    images, csv = make_collection(tmp_path, 2)
    _links(images, tmp_path / "elsewhere")
    md = pd.read_csv(csv)
    extra = pd.DataFrame([dict(image=n, lat=55.7, lon=13.19) for n in ("passwd.jpg", "out.jpg", "outdir/04.jpg")])
    pd.concat([md, extra]).to_csv(csv, index=False)
    rep, logs = build(images, tmp_path / "index", csv, small_extractor)
    assert rep.num_images == 2
    why = {s["image"]: s["reason"] for s in rep.skipped}
    assert why == {"passwd.jpg": OUTSIDE_REASON, "out.jpg": OUTSIDE_REASON, "outdir/04.jpg": OUTSIDE_REASON}
    listed = pd.read_csv(tmp_path / "index" / "skipped.csv")
    assert set(listed.image) == set(why) and not any("/etc/passwd" in line for line in logs)
    md_idx = pd.read_csv(tmp_path / "index" / "metadata.csv")
    assert all(Path(p).resolve().is_relative_to(images.resolve()) for p in md_idx.path)

    # the same folder read from EXIF: the links are listed with the same reason
    rep2, _ = build(images, tmp_path / "index-exif", None, small_extractor, from_exif=True)
    why2 = {s["image"]: s["reason"] for s in rep2.skipped}
    assert rep2.num_images == 2 and why2["passwd.jpg"] == why2["out.jpg"] == why2["outdir/04.jpg"] == OUTSIDE_REASON

    # --allow-outside takes the outside photo; /etc/passwd is still no photo
    rep3, _ = build(images, tmp_path / "index-allow", None, small_extractor, from_exif=True, allow_outside=True)
    why3 = {s["image"]: s["reason"] for s in rep3.skipped}
    assert rep3.num_images == 4 and "out.jpg" not in why3 and why3["passwd.jpg"].startswith("not an image")


def test_served_thumbnails_refuse_symlinks_swapped_in_later(tiny, tmp_path, small_extractor):
    from fastapi.testclient import TestClient

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.apps.serve import create_app

    root = tmp_path / "c"
    images, csv = make_collection(root, 2)
    build(images, root / "index", csv, small_extractor)
    geo = Geolocator(GeoIndex(root / "index"), small_extractor, LocateConfig(places=False))
    client = TestClient(create_app(geo, preload_places=False))
    ok = client.get("/api/thumb/0")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    first = sorted(images.iterdir())[0]
    first.unlink()
    first.symlink_to("/etc/passwd")
    r = client.get("/api/thumb/0?size=17")  # a size not cached yet
    assert r.status_code == 404 and "not on disk" in r.json()["detail"] and "passwd" not in r.text
    assert client.get("/api/thumb/1").status_code == 200  # the other photo is still served


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil(), protocol=2)


@pytest.mark.parametrize("position", ["magic", "protocol", "sys_info", "state", "keys"])
def test_crafted_pth_runs_no_code(tmp_path, position):
    from delg_geo.features.models.torch_legacy import LEGACY_MAGIC, load_legacy_state_dict

    marker = tmp_path / "pwned"
    parts = {"magic": LEGACY_MAGIC, "protocol": 1001, "sys_info": {"little_endian": True}, "state": {}, "keys": []}
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        for name, obj in parts.items():
            f.write(_evil_pickle(marker) if name == position else pickle.dumps(obj, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_legacy_state_dict(p)
    assert not marker.exists()


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line breaks."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def test_model_path_warning_in_help_and_readme(capsys):
    for cmd in (["query"], ["index", "build"], ["extract"]):
        code, out, _ = run_cli(capsys, *cmd, "--help")
        assert code == 0 and "trusted models only" in _flat(out), cmd
    assert "trusted models only" in (REPO / "README.md").read_text()


# -- 3. no tracebacks --------------------------------------------------------------------------------

def _interrupted(tmp_path, small_extractor, monkeypatch) -> tuple[Path, Path, Path]:
    """A build killed (Ctrl-C) after extraction, before the final write: checkpoints, no manifest."""
    import index_builder.build as build_mod

    images, csv = make_collection(tmp_path, 3)
    index = tmp_path / "index"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build_mod, "_finalize", interrupt)
        with pytest.raises(KeyboardInterrupt):
            build(images, index, csv, small_extractor)
    assert (index / ".building" / "parts" / "part-00000.npz").exists() and not (index / "manifest.json").exists()
    return images, csv, index


@pytest.mark.parametrize("damage", ["failed.jsonl", "state.json"])
def test_resume_with_damaged_build_files(tmp_path, small_extractor, damage, monkeypatch):
    from delg_geo.index.geo_index import GeoIndex

    images, csv, index = _interrupted(tmp_path, small_extractor, monkeypatch)
    target = index / ".building" / damage
    target.write_text('{"key": "x", "row"' if damage == "failed.jsonl" else "")
    rep, logs = build(images, index, csv, small_extractor, resume=True)
    assert rep.num_images == 3 and rep.resumed == 3 and len(GeoIndex(index)) == 3
    expected = "damaged line(s) ignored" if damage == "failed.jsonl" else "is damaged"
    assert any(expected in line for line in logs), logs
    assert not (index / ".building").exists()


def test_non_numeric_latitude_in_an_index(tiny, tmp_path, capsys):
    index = copy_index(tiny, tmp_path)
    text = (index / "metadata.csv").read_text().splitlines()
    cols = text[0].split(",")
    row = text[2].split(",")
    row[cols.index("lat")] = "north"
    text[2] = ",".join(row)
    (index / "metadata.csv").write_text("\n".join(text) + "\n")
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    assert code == 2 and out == ""
    assert "metadata.csv" in err and "Traceback" not in err and "damaged" in err


def test_explain_pointing_at_a_folder(tiny, tmp_path, capsys):
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", tiny["index"], "--explain", tmp_path)
    assert code == 2 and out == "" and "--explain" in err and "is a folder" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_map_whose_parent_is_a_file_fails_before_any_answer(tiny, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", tiny["index"], "--map", f / "m.html")
    assert code == 2 and out == "" and "is a file, not a folder" in err and "Traceback" not in err
    assert f.read_text() == "x"


def test_outputs_in_a_new_folder_are_written(tiny, tmp_path, capsys):
    m = tmp_path / "new" / "deeper" / "m.html"
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", tiny["index"], "--map", m, "--top-k", "3")
    assert code == 0 and m.stat().st_size > 1000 and "01.jpg" in out


# -- 2. damaged indexes: checksums, verify, checks on open, damaged candidates --------------------------

def _manifest(index) -> dict:
    return json.loads((index / "manifest.json").read_text())


def _edit_manifest(index, fn) -> None:
    d = _manifest(index)
    fn(d)
    (index / "manifest.json").write_text(json.dumps(d, indent=2))


def test_every_file_has_a_checksum_and_verify_passes(tiny, capsys):
    from delg_geo.index.integrity import file_checksum

    m = _manifest(tiny["index"])
    assert set(m["checksums"]) == set(m["files"]) >= {"metadata.csv", "global.npy", "local_codes.npy", "skipped.csv"}
    for name, cs in m["checksums"].items():
        assert cs.startswith("xxh3_128:") and file_checksum(tiny["index"] / name) == cs
    code, out, err = run_cli(capsys, "index", "verify", "--index", tiny["index"])
    assert code == 0 and out.strip().endswith("ok") and "metadata.csv: ok" in out, err
    code, out, _ = run_cli(capsys, "index", "verify", "--index", tiny["index"], "--json")
    rep = json.loads(out)
    assert code == 0 and rep["ok"] and rep["checked"] == ["sizes", "checksums", "metadata", "global index", "cross-checks",
                                                          "local features", "inverted file"]


def test_edited_coordinate_is_refused(tiny, tmp_path, capsys, small_extractor):
    index = copy_index(tiny, tmp_path)
    before = answers(index, lund(1)[0], small_extractor)
    md = (index / "metadata.csv").read_text()
    lat = f"{pd.read_csv(index / 'metadata.csv').lat[1]}"
    edited = md.replace(lat, str(float(lat) + 3.0)[: len(lat)], 1)
    assert len(edited) == len(md) and edited != md  # same size: only the content differs
    (index / "metadata.csv").write_text(edited)
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    assert code == 2 and out == "" and "damaged index" in err and "metadata.csv content does not match its checksum" in err
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and "metadata.csv: DAMAGED" in out and "metadata.csv" in err
    # the other files are intact: restoring the file restores the answers
    (index / "metadata.csv").write_text(md)
    assert answers(index, lund(1)[0], small_extractor) == before


@pytest.mark.parametrize("with_checksums", [True, False])
def test_random_bytes_in_global_vectors(tiny, tmp_path, capsys, with_checksums):
    index = copy_index(tiny, tmp_path)
    name = "global.npy"  # an exact index: FAISS is built from these vectors when the index opens
    size = (index / name).stat().st_size
    head = (index / name).read_bytes()[:128]  # the header survives; the vectors do not
    (index / name).write_bytes(head + np.random.default_rng(0).bytes(size - 128))
    if not with_checksums:  # as an index built before checksums were recorded
        _edit_manifest(index, lambda d: (d.pop("checksums"), d.pop("stamps", None)))
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    assert code == 2 and out == "" and "damaged index" in err and name in err
    assert "no candidates" not in err
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and name in err


@pytest.mark.parametrize("with_checksums", [True, False])
def test_random_bytes_in_the_inverted_file(tiny, tmp_path, capsys, with_checksums):
    """Image ids beyond the index in asmk_ids.npy: a query refuses the index naming the file (the
    checksum on open, or the id when a list is read), and `index verify` names it too."""
    index = copy_index(tiny, tmp_path)
    name = "asmk_ids.npy"
    ids = np.load(index / name, mmap_mode="r+")
    ids[:] = np.random.default_rng(1).integers(2**20, 2**31, len(ids), dtype=np.uint32)
    ids.flush()
    del ids
    if not with_checksums:
        _edit_manifest(index, lambda d: (d.pop("checksums"), d.pop("stamps", None)))
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", index)
    assert code == 2 and out == "" and "damaged index" in err and name in err, err
    # without checksums, the id itself gives it away
    assert ("content does not match its checksum" if with_checksums else "beyond the") in err, err
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and name in err + out


def _damage_local(index, image_id: int, what: str) -> None:
    offsets = np.load(index / "local_offsets.npy")
    a, b = int(offsets[image_id]), int(offsets[image_id + 1])
    # the compact store holds int8 codes and uint16 keypoints: no NaN can be stored, so the damage
    # is zeroed codes (decoded: zero vectors) and keypoints at the largest value (outside the image)
    name = "local_keypoints.npy" if what.startswith("kp") else "local_codes.npy"
    arr = np.load(index / name, mmap_mode="r+")
    if what == "desc_zero":
        arr[a:b] = 0
    elif what == "kp_huge":
        arr[a:b] = np.iinfo(arr.dtype).max
    arr.flush()
    del arr


@pytest.mark.parametrize("what", ["desc_zero", "kp_huge"])
def test_damaged_candidate_is_skipped_with_a_note(tiny, tmp_path, small_extractor, monkeypatch, capsys, what):
    import delg_geo.index.integrity as integrity
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig

    index = copy_index(tiny, tmp_path)
    query = lund(2)[1]  # 02.jpg is image 1 of the index: its own best match
    before = Geolocator(GeoIndex(index), small_extractor, LocateConfig(top_k=3, places=False)).locate(query)
    assert before.neighbour.id == 1 and before.method == "verified"
    _damage_local(index, 1, what)
    # with checksums, opening refuses the index outright, naming the file
    code, out, err = run_cli(capsys, "query", query, "--index", index)
    name = "local_keypoints.npy" if what.startswith("kp") else "local_codes.npy"
    assert code == 2 and out == "" and f"{name} content does not match its checksum" in err
    # a store too large to checksum on open (here: a 0-byte budget) is checked per candidate; its
    # stamp's sampled blocks need not cover one image's rows (here: no stamp at all)
    monkeypatch.setattr(integrity, "CHEAP_CHECK_BYTES", 0)
    _edit_manifest(index, lambda d: d.pop("stamps", None))
    geo = Geolocator(GeoIndex(index), small_extractor, LocateConfig(top_k=3, places=False))
    p = geo.locate(query)
    assert p.neighbour.id != 1 and all(a.id != 1 for a in p.alternatives)
    assert "skipped 1 damaged candidate" in p.note and "id 1 (02.jpg)" in p.note and "index verify" in p.note
    # verify finds it even without checksums (an index built before they were recorded)
    _edit_manifest(index, lambda d: (d.pop("checksums"), d.pop("stamps", None)))
    code, out, err = run_cli(capsys, "index", "verify", "--index", index)
    assert code == 1 and "image 1 (02.jpg): local features" in err


def test_add_refuses_a_damaged_index(tiny, tmp_path, small_extractor):
    from delg_geo.core.errors import IndexFormatError

    index = copy_index(tiny, tmp_path)
    _damage_local(index, 0, "desc_zero")
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    with pytest.raises(IndexFormatError, match="local_codes.npy content does not match"):
        build(tiny["images"], index, tiny["csv"], small_extractor, add=True, resume=True)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # nothing touched


# -- 4. every interrupted state recovers: a harness that SIGKILLs real build processes -----------------

BUILD_POINTS = ["start", "state", "part-tmp", "part", "failed", "extracted", "staging", "staged", "swap",
                "manifest", "staging-removed"]
ADD_POINTS = ["state", "part", "failed", "extracted", "staging", "staged", "swap", "manifest", "staging-removed"]

_BUILD_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from _fake_extractor import FakeExtractor
from index_builder.build import BuildOptions, build_index
build_index({images!r}, {index!r}, {csv!r}, extractor=FakeExtractor(), add={add}, resume={add},
            options=BuildOptions(progress=False, part_size=2, batch_size=1), log=lambda m: None)
"""


def _killed_build(point: str, images: Path, index: Path, csv: Path, add: bool = False) -> None:
    import subprocess

    code = _BUILD_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), images=str(images), index=str(index),
                                csv=str(csv), add=add)
    env = dict(os.environ, DELG_GEO_TEST_KILL_AT=point)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])  # it really was killed there


def _whole_or_absent(index: Path, n_ok: set[int]) -> None:
    """Never a half-written index that looks whole: a manifest means an index that opens."""
    from delg_geo.index.geo_index import GeoIndex

    if (index / "manifest.json").exists():
        assert len(GeoIndex(index, device="cpu")) in n_ok


def _recovered(index: Path, n: int, rep) -> None:
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.index.check import verify_index

    assert rep.num_images == n
    assert not (index / ".building").exists() and not (index / ".staging").exists()
    idx = GeoIndex(index, device="cpu")
    assert len(idx) == n and idx.metadata.path.is_unique
    assert verify_index(index)["ok"]
    listed = pd.read_csv(index / "skipped.csv")
    assert not listed.duplicated(["image", "reason"]).any()
    assert listed[listed.reason != "already in the index"].image.tolist() == ["broken.jpg"]


@pytest.mark.parametrize("point", BUILD_POINTS)
def test_killed_build_recovers(tmp_path, point):
    from delg_geo.core.errors import DelgGeoError

    sys.path.insert(0, str(REPO / "tests"))
    from _fake_extractor import FakeExtractor

    images, csv = fake_collection(tmp_path, [f"{k}.png" for k in range(5)], broken="broken.jpg")
    index = tmp_path / "index"
    _killed_build(point, images, index, csv)
    _whole_or_absent(index, {5})
    building = index / ".building"
    had_work = (building / "failed.jsonl").exists() or any((building / "parts").glob("part-*.npz"))
    had_manifest = (index / "manifest.json").exists() or (index / ".staging" / "manifest.json").exists()
    # a plain rerun either works (nothing worth resuming was left), or says what to do
    try:
        rep, _ = build(images, index, csv, FakeExtractor())
        assert not had_work and not had_manifest, point
    except DelgGeoError as e:
        assert had_work or had_manifest, (point, str(e))
        assert re.search("--resume|already holds an index", str(e)), str(e)
        rep, logs = build(images, index, csv, FakeExtractor(), resume=True)  # the obvious command
    _recovered(index, 5, rep)
    # and the recovered index takes more images
    images2, csv2 = fake_collection(tmp_path / "more", ["m.png"])
    rep2, _ = build(images2, index, csv2, FakeExtractor(), add=True, resume=True)
    assert rep2.num_images == 6 and rep2.added == 1


@pytest.mark.parametrize("point", ADD_POINTS)
def test_killed_add_recovers(tmp_path, point):
    sys.path.insert(0, str(REPO / "tests"))
    from _fake_extractor import FakeExtractor

    images, csv3 = fake_collection(tmp_path, [f"{k}.png" for k in range(3)])
    index = tmp_path / "index"
    build(images, index, csv3, FakeExtractor())
    _, csv6 = fake_collection(tmp_path, [f"{k}.png" for k in range(5)], broken="broken.jpg")
    _killed_build(point, images, index, csv6, add=True)
    _whole_or_absent(index, {3, 5})  # the old index, or the new one: never a mix
    rep, _ = build(images, index, csv6, FakeExtractor(), add=True, resume=True)  # `index add` again
    _recovered(index, 5, rep)


def test_failed_build_on_bad_metadata_leaves_nothing(tmp_path, small_extractor):
    from delg_geo.core.errors import MetadataError

    images, csv = make_collection(tmp_path, 2)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,latitude_typo,lon\n01.jpg,55.7,13.2\n")
    index = tmp_path / "index"
    with pytest.raises(MetadataError, match="missing required column 'lat'"):
        build(images, index, bad, small_extractor)
    assert not (index / ".building").exists()
    rep, _ = build(images, index, csv, small_extractor)  # the same command with the CSV fixed
    assert rep.num_images == 2
    # an old run's empty leftovers (state.json only) do not block a plain rerun either
    shutil.rmtree(index)
    (index / ".building").mkdir(parents=True)
    (index / ".building" / "state.json").write_text("{}")
    rep, _ = build(images, index, csv, small_extractor)
    assert rep.num_images == 2 and not (index / ".building").exists()


# -- 5. --from-exif lists every file; HEIC is read with its GPS ---------------------------------------

def _heic_from(jpg: Path, out: Path, side: int = 320) -> Path:
    """A HEIC made (with pillow-heif) from a real photo, downsized, with its EXIF (GPS included)."""
    from PIL import Image

    import delg_geo.features.images  # noqa: F401 - registers the HEIF plugin

    img = Image.open(jpg)
    exif = img.info["exif"]
    img.thumbnail((side, side))
    img.save(out, format="HEIF", exif=exif, quality=70)
    return out


def test_heic_is_read_with_its_gps(tmp_path):
    from delg_geo.features.exif import read_exif_gps
    from delg_geo.features.images import load_image

    src = lund(2)[1]
    heic = _heic_from(src, tmp_path / "IMG_0001.HEIC")
    assert heic.read_bytes()[4:12] == b"ftypheic"
    assert read_exif_gps(heic) == pytest.approx(read_exif_gps(src), abs=1e-9)
    img = load_image(heic, max_side=1024)
    assert img.array.shape == (240, 320, 3) and img.original_size == (320, 240)


def test_from_exif_lists_every_file_it_cannot_use(tmp_path, small_extractor):
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    src = lund(2)
    shutil.copy(src[0], images / "01.jpg")
    _heic_from(src[1], images / "02.heic")
    photo = Image.open(src[0])
    photo.save(images / "anim.gif")
    photo.save(images / "scan.bmp")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("shot list")
    Image.new("RGB", (1, 1), (90, 90, 90)).save(images / "pixel.jpg", exif=photo.info["exif"])  # GPS, 1x1
    rep, _ = build(images, tmp_path / "index", None, small_extractor, from_exif=True)
    why = {s["image"]: s["reason"] for s in rep.skipped}
    assert rep.num_images == 2  # 01.jpg and 02.heic
    assert why["anim.gif"] == "no EXIF GPS data (GIF image)"
    assert why["scan.bmp"] == "no EXIF GPS data (BMP image)"
    assert why["empty.jpg"] == "empty file (0 bytes)"
    assert why["notes.txt"] == "not an image (no image format recognised)"
    assert "image too small to describe (1x1 pixels" in why["pixel.jpg"]
    # every file in the folder is indexed or listed: nothing silently lost
    md = pd.read_csv(tmp_path / "index" / "metadata.csv")
    assert sorted(md.image) == ["01.jpg", "02.heic"]
    assert set(md.image) | set(why) == {p.name for p in images.iterdir()}
    assert set(pd.read_csv(tmp_path / "index" / "skipped.csv").image) == set(why)
    heic_row = md[md.image == "02.heic"].iloc[0]
    assert (heic_row.width, heic_row.height) == (320, 240)


# -- 6. clear messages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", ["0", "-5"])
def test_top_k_below_one_is_a_usage_error(tiny, capsys, k):
    code, out, err = run_cli(capsys, "query", lund(1)[0], "--index", tiny["index"], "--top-k", k)
    assert code == 2 and out == "" and "Invalid value for '--top-k'" in _flat(err) and "greater than or equal to 1" in _flat(err)
    from delg_geo.retrieval.locate import LocateConfig

    with pytest.raises(ValueError, match="top_k must be at least 1"):
        LocateConfig(top_k=int(k))


def test_empty_and_unsupported_files_are_named(tiny, tmp_path, capsys):
    from delg_geo.core.errors import ImageLoadError
    from delg_geo.features.images import load_image

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    code, out, err = run_cli(capsys, "query", empty, lund(1)[0], "--index", tiny["index"], "--top-k", "3")
    assert code == 1 and f"{empty}: empty file (0 bytes)" in err and "BufferedReader" not in err
    assert "01.jpg" in out  # the other photo is still answered
    cases = {
        b"%PDF-1.7\n%\xe2\xe3": "unsupported format: a PDF document",
        b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00": "unsupported format: a video (MP4/MOV)",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00": "AVIF",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>": "unsupported format: an SVG drawing",
    }
    for head, msg in cases.items():
        p = tmp_path / "photo.jpg"
        p.write_bytes(head + b"\x00" * 64)
        with pytest.raises(ImageLoadError) as e:
            load_image(p)
        assert msg in str(e.value), (head, str(e.value))


def test_heic_without_the_plugin_is_named(tmp_path, monkeypatch):
    import delg_geo.features.images as images

    monkeypatch.setattr(images, "HEIF_SUPPORTED", False)
    assert images._unidentified_reason(b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00") == (
        "unsupported image format: HEIC/HEIF (pip install pillow-heif to read it)")


def test_one_pixel_cap_one_message(tmp_path):
    from PIL import Image

    from delg_geo.core.errors import ImageLoadError
    from delg_geo.features.images import DEFAULT_MAX_PIXELS, load_image

    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS == 100_000_000
    msgs = []
    for side in (10_001, 15_000):  # just over the cap (this module's check), and over Pillow's 2x error
        p = tmp_path / f"big{side}.png"
        Image.new("1", (side, side)).save(p)
        with pytest.raises(ImageLoadError) as e:
            load_image(p)
        msgs.append(e.value.reason)
    assert msgs == [f"image too large ({n * n:,} pixels; the limit is 100,000,000 pixels)" for n in (10_001, 15_000)]
    Image.new("1", (10_000, 10_000)).save(tmp_path / "ok.png")  # exactly at the cap: read
    assert load_image(tmp_path / "ok.png", max_side=100).array.shape == (100, 100, 3)


def test_index_built_with_a_model_folder_records_it(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from _delg_export import export_tiny_delg

    from delg_geo.core.errors import ModelError
    from delg_geo.retrieval.locate import Geolocator
    from delg_geo.features.models import get_extractor

    model_dir = export_tiny_delg(tmp_path / "my_delg")
    images, csv = fake_collection(tmp_path, ["a.png", "b.png"])
    rep, _ = build(images, tmp_path / "index", csv, get_extractor(str(model_dir)))
    m = _manifest(tmp_path / "index")
    assert rep.num_images == 2 and m["model_path"] == str(model_dir.resolve())
    geo = Geolocator.from_index(tmp_path / "index")  # no --model needed: the manifest says where
    assert geo.extractor.fingerprint == m["model_fingerprint"]
    model_dir.rename(tmp_path / "moved")
    with pytest.raises(ModelError, match=f"built with the SavedModel folder {re.escape(str(model_dir.resolve()))}.*pass --model PATH"):
        Geolocator.from_index(tmp_path / "index")
    assert Geolocator.from_index(tmp_path / "index", model=str(tmp_path / "moved")).extractor.fingerprint == m["model_fingerprint"]


# -- 8. what a new user sees ------------------------------------------------------------------------------

def test_query_prints_no_tensorflow_lines_and_names_the_place(tiny, tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "ABSL", "GRPC"))}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-m", "delg_geo.apps.cli", "query", str(lund(1)[0]), "--index", str(tiny["index"]),
                        "--top-k", "3"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for noise in ("I0000", "E0000", "W0000", "oneDNN", "cudart", "cuInit", "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in r.stderr, r.stderr
    head, rule, row = r.stdout.splitlines()[:3]
    assert head.split()[:4] == ["image", "lat", "lon", "place"] and "Lund, Skane, SE" in row


# -- 7. the server under load ------------------------------------------------------------------------------

def _jpeg_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def test_full_queue_answers_503_with_retry_after(tiny, small_extractor):
    import threading

    from fastapi.testclient import TestClient

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.apps.serve import ServeConfig, create_app

    class Gated:
        """The extractor, held at a gate so that one request stays inside."""

        def __init__(self, inner):
            self.inner, self.gate, self.inside = inner, threading.Event(), threading.Event()
            for a in ("model_id", "fingerprint", "global_dim", "local_dim", "max_side"):
                setattr(self, a, getattr(inner, a))

        def extract(self, image):
            self.inside.set()
            assert self.gate.wait(60)
            return self.inner.extract(image)

    gated = Gated(small_extractor)
    geo = Geolocator(GeoIndex(tiny["index"]), gated, LocateConfig(top_k=3, places=False))
    client = TestClient(create_app(geo, ServeConfig(max_concurrent=1, max_queue=0), preload_places=False))
    photo = _jpeg_bytes(lund(1)[0])
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=client.post("/api/locate", files={"file": ("a.jpg", photo)})))
    t.start()
    assert gated.inside.wait(60)
    busy = client.post("/api/locate", files={"file": ("b.jpg", photo)})
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["detail"]
    gated.gate.set()
    t.join(60)
    assert first["r"].status_code == 200 and first["r"].json()["neighbour"]["image"] == "01.jpg"
    again = client.post("/api/locate", files={"file": ("c.jpg", photo)})  # the slot was given back
    assert again.status_code == 200 and again.json()["lat"] == first["r"].json()["lat"]
    assert client.get(again.headers["x-match-image"]).headers["content-type"] == "image/png"


def test_server_refuses_too_small_and_empty_uploads(tiny, small_extractor):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.apps.serve import create_app

    geo = Geolocator(GeoIndex(tiny["index"]), small_extractor, LocateConfig(top_k=3, places=False))
    client = TestClient(create_app(geo, preload_places=False))
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    r = client.post("/api/locate", files={"file": ("dot.png", buf.getvalue())})
    assert r.status_code == 415 and "too small to describe (1x1 pixels" in r.json()["detail"]
    r = client.post("/api/locate", files={"file": ("x.heic", b"\x00\x00\x00\x1cftypheic" + b"\x00" * 40)})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]


@pytest.mark.benchmark
def test_server_memory_stays_flat_over_rounds(tiny, tmp_path):
    """tools/bench_serve.py: 4 rounds of 8 concurrent uploads, one of them 6000x6000, against the
    tiny index: RSS grows at most 15 % after the first round, no errors."""
    import subprocess

    venice = shared_path("venice")
    q = pd.read_csv(venice / "queries.csv").head(8)
    pd.DataFrame({"path": [str(venice / p) for p in q.image]}).to_csv(tmp_path / "q.csv", index=False)
    cmd = [sys.executable, str(REPO / "tools" / "bench_serve.py"), "--index", str(tiny["index"]), "--requests", "8",
           "--concurrency", "8", "--rounds", "4", "--big", "--time-limit", "900", "--images", str(tmp_path / "q.csv")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=2))
    assert out["errors"] == 0 and out["ok"] + out["busy_503"] == 32
    assert out["rss_growth_after_first_round"] <= 0.15


def test_local_feature_guard_catches_every_kind_of_damage():
    """The damage the issue found in a float16 store (format 1), on the arrays local_features returns."""
    from delg_geo.features.base import l2_normalize
    from delg_geo.index.integrity import local_features_problem

    rng = np.random.default_rng(0)
    kp = (rng.uniform(0, 1, (500, 2)) * [400, 300]).astype(np.float32)
    desc = l2_normalize(rng.standard_normal((500, 112)).astype(np.float32), axis=1)
    size = (400, 300)
    assert local_features_problem(kp, desc, size) is None
    assert local_features_problem(kp[:0], desc[:0], size) is None  # no features: nothing to check
    nan_desc = desc.copy()
    nan_desc[7] = np.nan
    assert local_features_problem(kp, nan_desc, size) == "non-finite local descriptors"
    random_desc = rng.random(desc.shape).astype(np.float32)  # random values, as in the issue
    assert local_features_problem(kp, random_desc, size).startswith("local descriptor norms")
    assert local_features_problem(kp, np.full_like(desc, 6e4), size).startswith("local descriptor norms 6.35e+05")
    assert local_features_problem(kp, np.full_like(desc, 1e30), size) == "non-finite local descriptors"  # overflows
    assert local_features_problem(kp, np.zeros_like(desc), size).startswith("local descriptor norms")
    assert local_features_problem(np.full_like(kp, 1e30), desc, size) == "keypoints outside the 400x300 image"
    nan_kp = kp.copy()
    nan_kp[3, 1] = np.nan
    assert local_features_problem(nan_kp, desc, size) == "non-finite keypoints"
    assert local_features_problem(kp[:10], desc, size) == "10 keypoints but 500 descriptors"
    # the norm reference is the index's own: binarised (+-1) descriptors are not damage
    signs = np.sign(rng.standard_normal((500, 112))).astype(np.float32)
    assert local_features_problem(kp, signs, size, norm_ref=float(np.sqrt(112))) is None

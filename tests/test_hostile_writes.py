"""Nothing lost, ever: ``--overwrite`` that validates first and swaps a complete index in, one
writer per index (real processes), the index never inside the photos, columns that are kept,
outputs that never overwrite each other, and storage errors as one line.

Each case asserts the exit code or the error, the message, and that nothing was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from test_hostile import answers, build, lund, make_collection, run_cli, small_extractor, tiny  # noqa: F401, F811 (fixtures)

pytestmark = pytest.mark.shared


def _fingerprint(index: Path) -> dict:
    """Every file of the index and its bytes' hash: what "nothing lost" compares."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(index.iterdir()) if p.is_file()
            and not p.name.startswith(".")}


@pytest.fixture
def built(tiny, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny["index"], index)
    return dict(tiny, index=index, before=_fingerprint(index))


# -- --overwrite validates everything first, and swaps a complete index in --------------------------

@pytest.mark.parametrize("case", ["missing-metadata", "no-lat-column"])
def test_overwrite_with_bad_metadata_keeps_the_old_index(built, tmp_path, small_extractor, case):
    from delg_geo.core.errors import MetadataError

    if case == "missing-metadata":
        csv, msg = tmp_path / "nope.csv", "not found"
    else:
        csv = tmp_path / "nolat.csv"
        pd.read_csv(built["csv"]).drop(columns=["lat"]).to_csv(csv, index=False)
        msg = "lat"
    with pytest.raises(MetadataError, match=msg):
        build(built["images"], built["index"], csv, small_extractor, overwrite=True)
    assert _fingerprint(built["index"]) == built["before"]
    assert answers(built["index"], lund(1)[0], small_extractor)[2] == 0


def test_overwrite_builds_aside_and_swaps_in_only_when_complete(built, tmp_path, small_extractor):
    # a rebuild killed before its swap leaves the old index answering, and a rerun completes it
    env = dict(os.environ, DELG_GEO_TEST_KILL_AT="rebuilt", PYTHONPATH=f"{REPO / 'tests'}:{REPO}")
    code = textwrap.dedent(f"""
        from test_hostile import build
        from delg_geo.features.models.lite_delg import LiteDelgExtractor
        build({str(built['images'])!r}, {str(built['index'])!r}, {str(built['csv'])!r},
              LiteDelgExtractor(scales=(0.7071, 1.0, 1.4142)), overwrite=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (built["index"] / ".rebuild" / "manifest.json").exists()
    assert _fingerprint(built["index"]) == built["before"]  # the old index is untouched and answers
    assert answers(built["index"], lund(1)[0], small_extractor)[2] == 0
    rep, logs = build(built["images"], built["index"], built["csv"], small_extractor, overwrite=True)
    assert rep.num_images == 3 and not (built["index"] / ".rebuild").exists()
    assert any("replaced the previous index" in m for m in logs)
    from delg_geo.index.check import verify_index

    assert verify_index(built["index"])["ok"]


def test_overwrite_refuses_a_folder_that_is_not_a_delg_geo_index(tmp_path, tiny, small_extractor):
    from delg_geo.core.errors import DelgGeoError

    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (webapp / "index.html").write_text("<html></html>")
    with pytest.raises(DelgGeoError, match="not a delg-geo index"):
        build(tiny["images"], webapp, tiny["csv"], small_extractor, overwrite=True)
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]


@pytest.mark.parametrize("where", ["same", "around", "inside-exif", "inside-holding-a-photo"])
def test_the_index_never_shares_the_photos_folder(tmp_path, small_extractor, where, capsys):
    images, csv = make_collection(tmp_path, 2)
    index = {"same": images, "around": tmp_path, "inside-exif": images / "index",
             "inside-holding-a-photo": images / "sub"}[where]
    source = ["--from-exif"] if where == "inside-exif" else ["--metadata", csv]
    if where == "inside-holding-a-photo":
        (images / "sub").mkdir()
        shutil.move(images / lund(2)[1].name, images / "sub" / lund(2)[1].name)
        md = pd.read_csv(csv)
        md.loc[1, "image"] = f"sub/{lund(2)[1].name}"
        md.to_csv(csv, index=False)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    overwrite = [] if where == "inside-holding-a-photo" else ["--overwrite"]
    code, out, err = run_cli(capsys, "index", "build", images, *source, "--index", index, *overwrite)
    assert code == 2 and "images folder" in err and "never delete a photo" in err and "Traceback" not in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_an_index_beside_the_photos_it_lists_is_allowed(tmp_path, small_extractor):
    """A collection folder with the photos in one subfolder and the index in another is the usual
    layout; the metadata lists the photos, so the index's files never mix with them."""
    images, csv = make_collection(tmp_path / "data", 2)
    md = pd.read_csv(csv)
    md["image"] = "images/" + md.image
    md.to_csv(csv, index=False)
    rep, _ = build(tmp_path / "data", tmp_path / "data" / "index", csv, small_extractor)
    assert rep.num_images == 2


def test_bad_index_targets_are_refused_before_any_work(tmp_path, tiny, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tiny["index"])
    for target, extra, msg in [(a_file, [], "is a file"), (a_file, ["--overwrite"], "is a file"),
                               (link, ["--overwrite"], "symbolic link")]:
        code, _, err = run_cli(capsys, "index", "build", tiny["images"], "--metadata", tiny["csv"], "--index", target, *extra)
        assert code == 2 and msg in err, err
    assert a_file.read_text() == "mine" and link.is_symlink() and (tiny["index"] / "manifest.json").exists()


def test_a_bad_index_type_fails_before_extracting(tmp_path, tiny, capsys):
    code, _, err = run_cli(capsys, "index", "build", tiny["images"], "--metadata", tiny["csv"], "--index",
                           tmp_path / "new", "--index-type", "zzz")
    assert code == 2 and "--index-type 'zzz'" in err and "flat" in err
    assert not (tmp_path / "new").exists()


# -- one writer per index ------------------------------------------------------------------------------

_HOLD = """
import sys, time
from delg_geo.index.lock import writer_lock
with writer_lock(sys.argv[1], command="delg-geo index build (holder)"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(index: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(index), str(seconds)], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_fails_naming_the_holder(built, tmp_path, small_extractor, capsys):
    from delg_geo.index.lock import IndexBusyError

    holder = _holder(built["index"], 60)
    try:
        with pytest.raises(IndexBusyError, match=rf"pid {holder.pid} .*delg-geo index build \(holder\).*started"):
            build(built["images"], built["index"], built["csv"], small_extractor, add=True)
        code, _, err = run_cli(capsys, "index", "calibrate", "--index", built["index"], "--sample", "2")
        assert code == 2 and f"pid {holder.pid}" in err and "one writer per index" in err
    finally:
        holder.kill()
        holder.wait()
    assert _fingerprint(built["index"]) == built["before"]


def test_two_real_builds_into_one_folder_never_both_succeed(tmp_path):
    """Two processes build 4 and 5 photos into one folder at once: one wins, the other fails and
    says why; the index holds the winner's photos, all of them."""
    images, csv4 = make_collection(tmp_path / "a", 4)
    csv5 = tmp_path / "five.csv"
    rows = pd.read_csv(csv4)
    pd.concat([rows, rows.iloc[:1].assign(image=rows.image[0])]).head(4).to_csv(csv5, index=False)
    shutil.copy(lund(5)[4], images / lund(5)[4].name)
    from delg_geo.features.exif import read_exif_gps

    lat, lon = read_exif_gps(lund(5)[4])
    pd.concat([rows, pd.DataFrame([dict(image=lund(5)[4].name, lat=lat, lon=lon)])]).to_csv(csv5, index=False)
    index = tmp_path / "index"
    script = textwrap.dedent("""
        import sys, time
        from test_hostile import build
        from delg_geo.features.models.lite_delg import LiteDelgExtractor
        ex = LiteDelgExtractor(scales=(0.7071, 1.0, 1.4142))
        start = float(sys.argv[3])
        while time.time() < start:
            time.sleep(0.01)
        rep, _ = build(sys.argv[1], sys.argv[2], sys.argv[4], ex)
        print("built", rep.num_images)
    """)
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}:{REPO}")
    start = time.time() + 25  # both load their model first, then start together
    procs = [subprocess.Popen([sys.executable, "-c", script, str(images), str(index), str(start), str(c)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in (csv4, csv5)]
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    winner = codes.index(0)
    loser_err = outs[1 - winner][1]
    assert "being written by" in loser_err or "already holds an index" in loser_err, loser_err
    n = int(outs[winner][0].split()[-1])
    from delg_geo.index.check import verify_index
    from delg_geo.index.geo_index import read_manifest

    assert read_manifest(index).num_images == n == (4, 5)[winner] and verify_index(index)["ok"]


def test_a_killed_writers_lock_is_taken_over(built, small_extractor):
    holder = _holder(built["index"], 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rep, _ = build(built["images"], built["index"], built["csv"], small_extractor, add=True)
    assert rep.num_images == 3  # nothing new to add, and no "being written" error


def test_readers_wait_for_a_swap_and_never_see_a_mix(built):
    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.index.lock import swapping

    opened = threading.Event()
    with swapping(built["index"]):
        t = threading.Thread(target=lambda: (GeoIndex(built["index"], device="cpu"), opened.set()))
        t.start()
        time.sleep(1.0)
        assert not opened.is_set()  # the reader waits while files are being moved
    t.join(60)
    assert opened.is_set()


# -- columns and outputs ---------------------------------------------------------------------------

def test_user_columns_named_like_the_index_own_are_kept_renamed(tmp_path, small_extractor):
    images, csv = make_collection(tmp_path, 2)
    md = pd.read_csv(csv).assign(id=["a-1", "a-2"], width=[4000, 3000], note=["x", "y"])
    md.to_csv(csv, index=False)
    rep, logs = build(images, tmp_path / "index", csv, small_extractor)
    out = pd.read_csv(tmp_path / "index" / "metadata.csv")
    assert list(out.user_id) == ["a-1", "a-2"] and list(out.user_width) == [4000, 3000] and list(out.note) == ["x", "y"]
    assert list(out.id) == [0, 1] and (out.width < 4000).all()  # the index's own columns are its own
    assert any("'id' are kept as 'user_id'" in m for m in logs) and rep.notes


def test_query_explain_and_extract_save_never_overwrite_each_other(built, tmp_path, capsys, monkeypatch):
    from delg_geo.apps.cli_common import distinct_stems

    a, b = tmp_path / "a", tmp_path / "b"
    for d, src in ((a, lund(2)[0]), (b, lund(2)[1])):
        d.mkdir()
        shutil.copy(src, d / "01.jpg")
    assert distinct_stems([a / "01.jpg", b / "01.jpg"]) == ["1-01", "2-01"]
    assert distinct_stems([a / "x.jpg", b / "y.jpg"]) == ["x", "y"]
    code, out, err = run_cli(capsys, "extract", a / "01.jpg", b / "01.jpg", a / "01.jpg", b / "01.jpg", "--save",
                             tmp_path / "feats")
    assert code == 0, err
    assert len(list((tmp_path / "feats").glob("*.npz"))) == 4
    assert err.count("features of") == 4


# -- a full disk and a read-only index -----------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs of this test's own (root only: mount needs it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (a full disk and a read-only folder are simulated with one)")
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_resume_recovers(tmp_path, tmpfs, small_extractor):
    from delg_geo.core.errors import DelgGeoError

    images, csv = make_collection(tmp_path, 3)
    index = tmpfs / "index"
    with pytest.raises(DelgGeoError) as e:
        build(images, index, csv, small_extractor)
    msg = str(e.value)
    assert "\n" not in msg and str(index) in msg and "the disk is full" in msg and "--resume" in msg
    assert not list(index.rglob("*.tmp.npz")) and not (index / ".staging").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    rep, _ = build(images, index, csv, small_extractor, resume=True)
    assert rep.num_images == 3


def test_a_read_only_index_answers_queries_and_refuses_writes_in_one_line(tmp_path, tmpfs, tiny, small_extractor, capsys):
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    index = tmpfs / "index"
    shutil.copytree(tiny["index"], index)
    before = _fingerprint(index)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert answers(index, lund(1)[0], small_extractor)[2] == 0  # readers need no write access
    code, out, err = run_cli(capsys, "index", "calibrate", "--index", index, "--sample", "2")
    assert code == 2 and "read-only" in err and str(index) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert _fingerprint(index) == before

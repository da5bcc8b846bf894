"""``index build --ray`` and ``bench --ray`` on a real local Ray cluster (2 CPUs, no mocks), against one process.

The Ray build must give the same index: same ids, images and coordinates, descriptors equal to
float tolerance, the same skipped list. A Ray build killed mid-way (SIGKILL of its driver)
resumes shard by shard without re-extracting the finished shards. The collection is 24 real
Venice photos where ../shared is present, and 10 generated images everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA, shared_path

ray = pytest.importorskip("ray")

SCALES = (0.7071, 1.0, 1.4142)  # three scales instead of seven: same code, a third of the time
BAD = "broken.jpg"  # a file that is not an image: listed as skipped, with its reason


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster with 2 CPUs for every Ray test (ray.init costs seconds)."""
    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def extractor():
    from delg_geo.features.models.lite_delg import LiteDelgExtractor

    return LiteDelgExtractor(scales=SCALES)


def _venice_collection(root: Path, n: int = 24) -> Path:
    venice = shared_path("venice")
    ref = pd.read_csv(venice / "reference.csv")
    sub = ref.iloc[:: len(ref) // n].head(n)
    (root / "images").mkdir(parents=True)
    for p in sub.image:  # copied, so that the collection holds the broken file too
        shutil.copy(venice / p, root / p)
    return _with_broken(root, sub[["image", "lat", "lon"]])


def _generated_collection(root: Path, n: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        w, h = (320, 240) if i % 3 else (240, 320)  # two sizes: batches group by size
        base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((16, 16, 1), np.uint8)) + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"g{i:02d}.jpg", quality=90)
        rows.append(dict(image=f"images/g{i:02d}.jpg", lat=45.43 + rng.normal(0, 0.01), lon=12.33 + rng.normal(0, 0.01)))
    return _with_broken(root, pd.DataFrame(rows))


def _with_broken(root: Path, rows: pd.DataFrame) -> Path:
    (root / "images" / BAD).write_text("this is not a JPEG")
    k = len(rows) // 2
    bad = pd.DataFrame([dict(image=f"images/{BAD}", lat=45.44, lon=12.33)])
    csv = root / "reference.csv"
    pd.concat([rows.iloc[:k], bad, rows.iloc[k:]], ignore_index=True).to_csv(csv, index=False)
    return csv


@pytest.fixture(scope="module", params=["venice", "generated"])
def collection(request, tmp_path_factory, extractor):
    """The collection and its single-process index (the reference the Ray builds must equal)."""
    from index_builder.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp(f"ray_{request.param}")
    csv = _venice_collection(root) if request.param == "venice" else _generated_collection(root)
    single = root / "single"
    rep = build_index(root, single, csv, extractor=extractor, options=BuildOptions(progress=False, part_size=8),
                      log=lambda m: None)
    return dict(root=root, csv=csv, single=single, report=rep, n=len(pd.read_csv(csv)))


def _assert_same_index(a: Path, b: Path) -> None:
    """Every file the manifests list, compared by what it holds (whatever the index's layout)."""
    import faiss

    from delg_geo.index.geo_index import GeoIndex, read_manifest

    ma, mb = read_manifest(a), read_manifest(b)
    assert (ma.num_images, ma.num_local_features, ma.model_fingerprint, ma.index_type) == (
        mb.num_images, mb.num_local_features, mb.model_fingerprint, mb.index_type)
    assert ma.skipped == mb.skipped and set(ma.files) == set(mb.files)
    cols = ["id", "image", "lat", "lon", "width", "height"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "metadata.csv")[cols], pd.read_csv(b / "metadata.csv")[cols])
    compared = 0
    for name in ma.files:
        if name.endswith(".npy"):
            x, y = np.load(a / name), np.load(b / name)
            assert x.shape == y.shape and x.dtype == y.dtype, name
            if x.dtype.kind == "f":  # float16 on disk: one unit in the last place
                tol = 2e-3 if x.dtype.itemsize <= 2 else 1e-5
                np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=tol, atol=tol, err_msg=name)
            else:  # small integers may be quantised values: one step of rounding
                np.testing.assert_allclose(x, y, atol=1 if x.dtype.itemsize <= 2 else 0, err_msg=name)
            compared += 1
        elif name.endswith(".faiss"):  # the same neighbours, at the same similarities, for any query
            fa, fb = faiss.read_index(str(a / name)), faiss.read_index(str(b / name))
            q = np.random.default_rng(0).standard_normal((16, fa.d)).astype(np.float32)
            (sa, ia), (sb, ib) = fa.search(q, 5), fb.search(q, 5)
            np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared >= 3, ma.files
    ga, gb = GeoIndex(a), GeoIndex(b)  # and what a query reads
    for i in range(len(ga)):
        (ka, da), (kb, db) = ga.local_features(i), gb.local_features(i)
        np.testing.assert_allclose(ka, kb, atol=1)  # integer pixels: one step of rounding
        da, db = np.asarray(da, np.float32), np.asarray(db, np.float32)
        # int8 codes: a float difference of 1e-6 in the batch can move a value one code step
        # (0.0024 measured); almost every value is equal, none further than a few steps
        assert np.mean(np.abs(da - db) > 2e-3) < 1e-3 and np.abs(da - db).max() < 1e-2, np.abs(da - db).max()


def test_ray_build_equals_single_process_build(collection, ray_cluster, extractor):
    from index_builder.build import BuildOptions, build_index
    from index_builder.ray_build import RayOptions

    out = collection["root"] / "ray"
    # shards of 5: parts cut differently from the single-process build's 8, same index
    rep = build_index(collection["root"], out, collection["csv"], extractor=extractor,
                      options=BuildOptions(progress=False, part_size=5), ray=RayOptions(workers=2), log=lambda m: None)
    n_ok = collection["n"] - 1
    assert rep.num_images == rep.added == n_ok and rep.resumed == 0
    assert rep.ray["workers"] == 2 and rep.ray["cpus_per_worker"] == 1.0 and rep.ray["failed_shards"] == 0
    assert rep.ray["shards"] == -(-collection["n"] // 5)  # the broken image is extracted (and fails) in its shard
    _assert_same_index(out, collection["single"])
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.image) == [f"images/{BAD}"]
    assert "images/broken.jpg" in skipped.reason[0] or BAD in skipped.reason[0], skipped.reason[0]
    assert not (out / ".building").exists()


def _real_photos_only(request) -> None:
    """The slower tests run once: on the Venice photos where present, else on the generated ones."""
    if request.node.callspec.params["collection"] == "generated" and (SHARED_DATA / "venice").exists():
        pytest.skip("run on the real Venice photos where they are present (the generated ones are the fallback)")


_KILLED_BUILD = textwrap.dedent("""
    import sys
    from index_builder.build import BuildOptions, build_index
    from index_builder.ray_build import RayOptions
    from delg_geo.features.models.lite_delg import LiteDelgExtractor
    root, out, csv, address = sys.argv[1:5]
    build_index(root, out, csv, extractor=LiteDelgExtractor(scales={scales}),
                options=BuildOptions(progress=False, part_size=2), ray=RayOptions(address=address, workers=2),
                log=lambda m: None)
""")


def test_killed_ray_build_resumes_shard_by_shard(collection, ray_cluster, extractor, tmp_path, request):
    from index_builder.build import BuildOptions, build_index
    from index_builder.ray_build import RayOptions

    _real_photos_only(request)

    out = tmp_path / "killed"
    parts = out / ".building" / "parts"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD.format(scales=SCALES), str(collection["root"]), str(out),
         str(collection["csv"]), ray_cluster],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("part-*.npz"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-build; Ray ends its workers
    proc.wait()
    proc.stderr.close()
    assert not (out / "manifest.json").exists()
    done = {}
    for p in parts.glob("part-*.npz"):
        with np.load(p) as z:
            done[p.name] = (list(z["keys"]), p.stat().st_mtime_ns)
    n_done = sum(len(k) for k, _ in done.values())
    failed_file = out / ".building" / "failed.jsonl"
    n_failed = len(failed_file.read_text().splitlines()) if failed_file.exists() else 0
    assert 2 <= n_done < collection["n"] - 1

    rep = build_index(collection["root"], out, collection["csv"], extractor=extractor, resume=True,
                      options=BuildOptions(progress=False, part_size=2), ray=RayOptions(workers=2), log=lambda m: None)
    # the finished shards were taken as they were; only the rest was extracted
    assert rep.resumed == n_done and rep.added == collection["n"] - 1 - n_done
    assert rep.ray["shards"] == len(_expected_runs(collection, done, n_failed))
    _assert_same_index(out, collection["single"])


def _expected_runs(collection, done, n_failed):
    """Shards the resumed build must have made: the images not in a finished part, in runs of 2."""
    from delg_geo.core.ray_pool import shard_runs

    md = pd.read_csv(collection["csv"])
    keys = [str((collection["root"] / p).resolve()) for p in md.image]
    finished = {str(k) for ks, _ in done.values() for k in ks}
    bad = str((collection["root"] / "images" / BAD).resolve())
    todo = {k for k in keys if k not in finished and not (n_failed and k == bad)}
    return shard_runs(keys, todo, finished, 2)


def test_shard_runs_never_span_a_finished_image():
    from delg_geo.core.ray_pool import shard_runs

    keys = list("abcdefghij")
    assert shard_runs(keys, set(keys), set(), 4) == [list("abcd"), list("efgh"), list("ij")]
    # c and g are done; f failed earlier (not a gap: it is listed already)
    runs = shard_runs(keys, set("abdehij"), set("cg"), 4)
    assert runs == [list("ab"), list("de"), list("hij")]


def test_worker_plan_from_cluster_resources():
    from delg_geo.core.ray_pool import RayOptions, plan_workers

    p = plan_workers(RayOptions(), {"CPU": 2.0})
    assert (p.workers, p.cpus_per_worker, p.gpus_per_worker, p.threads) == (2, 1.0, 0.0, 1)
    p = plan_workers(RayOptions(workers=1), {"CPU": 2.0})
    assert (p.workers, p.cpus_per_worker, p.threads) == (1, 2.0, 2)
    p = plan_workers(RayOptions(), {"CPU": 32.0, "GPU": 4.0})
    assert (p.workers, p.cpus_per_worker, p.gpus_per_worker) == (4, 8.0, 1.0)
    p = plan_workers(RayOptions(workers=8), {"CPU": 32.0, "GPU": 4.0})
    assert (p.workers, p.gpus_per_worker) == (8, 0.5)
    p = plan_workers(RayOptions(workers=4), {"CPU": 2.0})
    assert p.cpus_per_worker == 0.5 and p.threads == 1


# -- bench --ray ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def query_set(collection, tmp_path_factory):
    """Queries for the collection's index: real Venice queries, or the generated images themselves."""
    root = tmp_path_factory.mktemp("ray_queries")
    (root / "images").mkdir()
    if (collection["root"] / "images" / "g00.jpg").exists():
        q = pd.read_csv(collection["csv"]).query("image != @BAD_PATH", local_dict={"BAD_PATH": f"images/{BAD}"}).head(6)
        for p in q.image:
            shutil.copy(collection["root"] / p, root / p)
    else:
        venice = shared_path("venice")
        q = pd.read_csv(venice / "queries.csv").iloc[::30].head(7)[["image", "lat", "lon"]]
        for p in q.image:
            shutil.copy(venice / p, root / p)
    (root / "images" / BAD).write_text("not a photo")
    q = pd.concat([q.iloc[:3], pd.DataFrame([dict(image=f"images/{BAD}", lat=45.43, lon=12.33)]), q.iloc[3:]],
                  ignore_index=True)
    q.to_csv(root / "queries.csv", index=False)
    return root


def test_ray_bench_equals_single_process_bench(collection, query_set, ray_cluster, tmp_path, request):
    from delg_geo.evaluation.bench import BenchConfig, run_bench
    from delg_geo.core.ray_pool import RayOptions

    _real_photos_only(request)

    cfg = BenchConfig(methods=("verified", "global", "knn", "oracle"), top_k=10, sift_top_k=10, progress=False)
    out = {}
    for name, ray_opts in (("single", None), ("ray", RayOptions(workers=2))):
        out[name] = tmp_path / name
        run_bench(collection["single"], query_set / "queries.csv", query_set, out[name], cfg, log=lambda m: None,
                  ray=ray_opts, shard_size=3)
    assert not (out["ray"] / ".queries").exists()  # the shards have served
    s = {k: json.loads((v / "summary.json").read_text()) for k, v in out.items()}
    assert s["ray"]["n_queries"] == s["single"]["n_queries"] == len(pd.read_csv(query_set / "queries.csv")) - 1
    assert s["ray"]["failed"] == s["single"]["failed"] and BAD in s["ray"]["failed"][0]["img_id"]
    p = {k: pd.read_csv(v / "predictions.csv") for k, v in out.items()}
    for m in ("global", "knn", "oracle"):  # no randomness: the same answers
        a, b = (p[k][p[k].method == m].reset_index(drop=True) for k in ("single", "ray"))
        assert list(a.img_id) == list(b.img_id)
        np.testing.assert_allclose(a[["predicted_lat", "predicted_long"]], b[["predicted_lat", "predicted_long"]], atol=1e-9)
    with np.load(out["single"] / "candidates.npz") as a, np.load(out["ray"] / "candidates.npz") as b:
        np.testing.assert_array_equal(a["img_id"], b["img_id"])
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_allclose(a["similarities"], b["similarities"], atol=1e-5)
        # pydegensac seeds RANSAC from the clock: the same pairs, inlier counts within RANSAC's noise
        ia, ib = a["inliers"].astype(float), b["inliers"].astype(float)
        # (two runs in one process differ by 0.8-1.0 inliers per pair on average, measured on 7 Venice queries)
        assert ia.max() >= 10 and np.abs(ia - ib).mean() <= 2.5, (ia.max(axis=1), ib.max(axis=1))
        np.testing.assert_allclose(ia.max(axis=1), ib.max(axis=1), rtol=0.25, atol=4)


def test_killed_ray_bench_resumes_its_shards(collection, query_set, ray_cluster, tmp_path, request):
    from delg_geo.evaluation.queries import read_queries
    from delg_geo.evaluation.ray_bench import SHARDS, query_candidates_on_ray
    from delg_geo.core.ray_pool import RayOptions

    _real_photos_only(request)

    items, _ = read_queries(query_set / "queries.csv", query_set)
    first = query_candidates_on_ray(collection["single"], items, tmp_path, 10, 10, RayOptions(workers=2), 2,
                                    progress=False, log=lambda m: None)
    parts = sorted((tmp_path / SHARDS).glob("part-*.npz"))
    assert len(parts) == -(-len(items) // 2)
    # as if killed before the last two shards were written
    for p in parts[-2:]:
        p.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:-2]}
    logs = []
    again = query_candidates_on_ray(collection["single"], items, tmp_path, 10, 10, RayOptions(workers=1), 2,
                                    progress=False, log=logs.append)
    redone = sum(2 for _ in parts[-2:]) - (len(items) % 2)
    assert any(f"resuming: {len(items) - redone} queries already done" in m for m in logs), logs
    assert {p.name: p.stat().st_mtime_ns for p in parts[:-2]} == kept  # finished shards untouched
    np.testing.assert_array_equal(again.positions, first.positions)
    assert again.failed == first.failed and len(first.failed) == 1
    np.testing.assert_array_equal(again.ids, first.ids)
    np.testing.assert_allclose(again.global_desc, first.global_desc, atol=1e-5)
    n_kept = len(items) - redone - 1  # the broken query is among the kept shards' failures
    np.testing.assert_array_equal(again.inliers[:n_kept], first.inliers[:n_kept])  # read back, not recomputed


_DYING_BUILD = textwrap.dedent("""
    import sys
    from index_builder.build import BuildOptions, build_index
    from index_builder.ray_build import RayOptions
    from delg_geo.features.models.lite_delg import LiteDelgExtractor
    root, out, csv = sys.argv[1:4]
    build_index(root, out, csv, extractor=LiteDelgExtractor(scales={scales}),
                options=BuildOptions(progress=False, part_size=8), ray=RayOptions(workers=1, num_cpus=1),
                log=lambda m: print(m, file=sys.stderr))
""")


def test_shard_whose_worker_dies_is_listed_with_the_reason(tmp_path):
    """Every worker is killed (SIGKILL) as it writes its shard: Ray restarts it and retries once,
    then the shard's images are listed with the reason; nothing is dropped or half-written."""
    csv = _generated_collection(tmp_path, n=4)
    out = tmp_path / "dying"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               DELG_GEO_TEST_KILL_AT="part-tmp")  # index_builder.build._write_part, before the rename
    proc = subprocess.run([sys.executable, "-c", _DYING_BUILD.format(scales=SCALES), str(tmp_path), str(out), str(csv)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "DelgGeoError" in proc.stderr, proc.stderr[-3000:]  # nothing to index
    assert "shard 0 failed on Ray" in proc.stderr
    failed = [json.loads(line) for line in (out / ".building" / "failed.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(f["image"] for f in failed) == sorted(pd.read_csv(csv).image)
    assert all("shard 0 failed on Ray" in f["reason"] and "Actor" in f["reason"] for f in failed), failed
    assert not list((out / ".building" / "parts").glob("part-*.npz")) and not (out / "manifest.json").exists()

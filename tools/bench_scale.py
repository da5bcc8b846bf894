"""Scale benchmark: a real index plus N synthetic distractors, queried one photo at a time.

    python tools/bench_scale.py --index INDEX --queries QUERIES.csv --images DIR --distractors N --out DIR --json

In the spirit of ROxford+1M: the real index (Venice) is copied under ``--out`` (an index of
format 1 is converted to the compact format first, without re-extracting) and N distractor
images are added to the copy by ``index_builder.assemble.assemble_index``, the same step every
build ends with, streaming in chunks of ``--chunk`` images (never all in memory):

* **Global descriptors:** a Gaussian mixture fitted to the index's own whitened global vectors
  (k-means components, each with its full covariance shrunk towards its diagonal), sampled,
  L2-normalised and stored as float16 like the real ones.
* **Local descriptors:** a Gaussian mixture fitted to a sample of the index's own local
  descriptors in the codec's projected space, sampled, L2-normalised and quantised by the same
  codec. To keep a million images within minutes on two cores, a pool of ``--local-pool``
  such codes is drawn once and each distractor image takes its codes at random from the pool.
  Feature counts, image sizes and keypoints are those of a randomly drawn real image.
* **Inverted file (ASMK):** where the real index has one, the copy gets the codebook a build of
  that many images would fit (``asmk_words_for``: about 56,000 words at a million), fitted on the real
  photos' stored features; the real photos' entries are recomputed with it, and each
  distractor's are aggregated from its drawn codes exactly as a build would (each pool code's
  word and signature computed once; codes that share a word in one image are summed).
* **Coordinates:** the MP-16 distribution of ``--cells`` (S2 cells of the 4.7 M training photos):
  a cell drawn in proportion to its photo count, at its photos' mean position, jittered
  uniformly over about the cell's size. Most distractors lie far from the query city; a few
  inside it.

When N images with local features would not fit in ``--max-disk-gb``, the distractors get
global descriptors only (``distractor_local_features`` is false in the output; a candidate
without local features never verifies).

The queries then run one at a time (``Geolocator.locate``: extract, search, verify) in a
separate process for the index without and with the distractors, so that ``peak_rss_gb`` is the
query process's own. Both runs answer with the same decision rule and confidence: the real
index's calibration is carried over to the copy (as after ``index add`` without recalibrating).
Every query's answer is kept in ``OUT/queries-without.csv`` and ``OUT/queries-with.csv``. The
last line of stdout is one JSON object (``--json``: nothing else on stdout; progress goes to
stderr). Accuracies are fractions of the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DEFAULT_CELLS = Path(__file__).resolve().parents[2] / "shared" / "data" / "im2gps_meta" / "geo-cells" / "cells_50_1000.csv"
EARTH_KM_PER_DEG = 111.32
#: look-alike: every distractor's global vector from the mixture fitted to the index (the issue's
#: protocol: a million more photos of the index's city, placed around the world). elsewhere: the
#: same inside the collection's own area; beyond it, the mixture turned by one of 16 random
#: rotations (by S2 cell), i.e. places with the same statistics that do not look like the city
#: (tools/distractor_realism.py measures both against real photos taken elsewhere).
DISTRACTOR_MODELS = ("look-alike", "elsewhere")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the distractor model -----------------------------------------------------------------------

def _mixture(x: np.ndarray, k: int, seed: int, shrink: float = 0.2):
    """(weights, means, Cholesky factors) of a k-component Gaussian mixture: k-means clusters,
    each with its full covariance shrunk towards its diagonal (fitted on few points per cluster)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    k = int(max(1, min(k, len(x) // 20)))
    if k > 1:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign.ravel()
    else:
        assign = np.zeros(len(x), np.int64)
    weights, means, chols = [], [], []
    for c in range(k):
        xc = x[assign == c].astype(np.float64)
        if len(xc) < 2:
            continue
        mu = xc.mean(axis=0)
        cov = np.cov(xc, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(mu))
        weights.append(len(xc))
        means.append(mu)
        chols.append(np.linalg.cholesky(cov))
    w = np.asarray(weights, np.float64)
    return w / w.sum(), np.asarray(means, np.float32), np.asarray(chols, np.float32)


def _sample(rng, mix, n: int) -> np.ndarray:
    w, means, chols = mix
    comp = rng.choice(len(w), n, p=w)
    out = np.empty((n, means.shape[1]), np.float32)
    for c in np.unique(comp):
        rows = np.flatnonzero(comp == c)
        z = rng.standard_normal((len(rows), means.shape[1]), dtype=np.float32)
        out[rows] = means[c] + z @ chols[c].T
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def random_rotation(d: int, seed: int) -> np.ndarray:
    """A (d, d) orthogonal matrix drawn uniformly (Haar), seeded."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _cell_level(token: str) -> int:
    """The S2 level of a cell token (hex, trailing zeros stripped)."""
    cid = int(token.ljust(16, "0"), 16)
    lsb = cid & -cid
    return 30 - (lsb.bit_length() - 1) // 2


def read_cells(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, comment=None, skiprows=2)
    need = {"hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean"}
    if not need <= set(df.columns):
        raise SystemExit(f"{path}: expected the columns {sorted(need)}, found {list(df.columns)}")
    # the mean edge of an S2 cell: about 9220 km / 2^level
    df["edge_km"] = [9220.0 / 2 ** _cell_level(str(t)) for t in df.hex_id]
    return df


class Distractors:
    """Fitted once on a compact index; ``part(j)`` generates chunk ``j`` (seeded, repeatable)."""

    def __init__(self, index_dir: Path, cells: pd.DataFrame, n: int, chunk: int, seed: int, local: bool,
                 pool: int = 4_000_000, model: str = "look-alike", codebook=None):
        from delg_geo.index.store import LocalCodec, decode_keypoints, keypoint_unit

        if model not in DISTRACTOR_MODELS:
            raise SystemExit(f"--distractor-model {model!r}: use one of {', '.join(DISTRACTOR_MODELS)}")
        self.n, self.chunk, self.seed, self.local, self.model = n, chunk, seed, local, model
        rng = np.random.default_rng(seed)
        g = np.asarray(np.load(index_dir / "global.npy", mmap_mode="r"), np.float32)
        self.global_mix = _mixture(g, 16, seed)
        self.global_mean = g.mean(axis=0)
        if model == "elsewhere":  # a rotation of the mixture per group of S2 cells: other places
            self.rotations = np.stack([random_rotation(g.shape[1], 1000 + i) for i in range(16)])
            md_ll = pd.read_csv(index_dir / "metadata.csv", usecols=["lat", "lon"])
            from delg_geo.core.geo import haversine_km, weighted_centroid

            self.home = weighted_centroid(md_ll.lat.to_numpy(np.float64), md_ll.lon.to_numpy(np.float64))
            spread = haversine_km(md_ll.lat.to_numpy(), md_ll.lon.to_numpy(), *self.home)
            self.home_km = float(np.quantile(spread, 0.99)) + 5.0  # the collection's own area
        self.codec = LocalCodec.load(index_dir / "local_codec.npz")
        codes = np.load(index_dir / "local_codes.npy", mmap_mode="r")
        rows = np.sort(rng.choice(len(codes), min(len(codes), 200_000), replace=False))
        self.local_mix = _mixture(self.codec.decode(np.asarray(codes[rows])), 32, seed)
        per_image = max(1, len(codes) // max(1, len(np.load(index_dir / "local_offsets.npy")) - 1))
        pool = int(min(pool, n * per_image)) if local else 0
        self.pool = np.concatenate([self.codec.encode_projected(_sample(rng, self.local_mix, min(500_000, pool - a)))
                                    for a in range(0, pool, 500_000)]) if pool else None
        self.codebook = None
        if self.pool is not None and (codebook is not None or (index_dir / "asmk_codebook.npz").is_file()):
            from delg_geo.index.asmk import Codebook

            self.codebook = cb = codebook if codebook is not None else Codebook.load(index_dir / "asmk_codebook.npz")
            words, sigs = [], []
            for a in range(0, len(self.pool), 500_000):
                x = self.codec.decode(self.pool[a : a + 500_000])
                w = cb.assign(x)
                words.append(w.astype(np.int32))
                sigs.append(np.packbits(x - cb.fine[w] > 0, axis=1))
            self.pool_words, self.pool_sigs = np.concatenate(words), np.concatenate(sigs)
        md = pd.read_csv(index_dir / "metadata.csv", usecols=["width", "height"])
        self.sizes = md[["width", "height"]].to_numpy(np.int64)
        self.offsets = np.load(index_dir / "local_offsets.npy")
        kp = np.load(index_dir / "local_keypoints.npy", mmap_mode="r")
        units = np.repeat(keypoint_unit(self.sizes[:, 0], self.sizes[:, 1]), np.diff(self.offsets))
        self.keypoints = decode_keypoints(np.asarray(kp), 1) * units[:, None].astype(np.float32)
        p = cells.imgs_per_cell.to_numpy(np.float64)
        self.cell_p = p / p.sum()
        self.cells = cells[["latitude_mean", "longitude_mean", "edge_km"]].to_numpy(np.float64)

    def __len__(self) -> int:
        return -(-self.n // self.chunk)

    def loaders(self):
        return [lambda j=j: self.part(j) for j in range(len(self))]

    def part(self, j: int):
        from index_builder.assemble import Part

        a, b = j * self.chunk, min(self.n, (j + 1) * self.chunk)
        n = b - a
        rng = np.random.default_rng([self.seed, j])
        donors = rng.integers(0, len(self.sizes), n)
        sizes = self.sizes[donors]
        if self.local:
            counts = np.diff(self.offsets)[donors]
            rows = np.concatenate([np.arange(self.offsets[d], self.offsets[d + 1]) for d in donors])
            kp = self.keypoints[rows]
            drawn = rng.integers(0, len(self.pool), int(counts.sum()))
            codes = self.pool[drawn]
        else:
            counts = np.zeros(n, np.int64)
            kp = np.zeros((0, 2), np.float32)
            codes = np.zeros((0, self.codec.code_width), self.codec.code_dtype)
        cell_idx = rng.choice(len(self.cells), n, p=self.cell_p)
        cell = self.cells[cell_idx]
        dlat = rng.uniform(-0.5, 0.5, n) * cell[:, 2] / EARTH_KM_PER_DEG
        lat = np.clip(cell[:, 0] + dlat, -89.9, 89.9)
        dlon = rng.uniform(-0.5, 0.5, n) * cell[:, 2] / (EARTH_KM_PER_DEG * np.maximum(np.cos(np.radians(lat)), 0.05))
        lon = (cell[:, 1] + dlon + 180.0) % 360.0 - 180.0
        names = [f"distractor/{i:09d}" for i in range(a, b)]
        md = pd.DataFrame(dict(image=names, path=names, lat=np.round(lat, 6), lon=np.round(lon, 6),
                               width=sizes[:, 0], height=sizes[:, 1]))
        g = _sample(rng, self.global_mix, n)
        if self.model == "elsewhere":
            from delg_geo.core.geo import haversine_km

            away = haversine_km(lat, lon, *self.home) > self.home_km
            group = cell_idx % len(self.rotations)
            for r in np.unique(group[away]):
                rows = np.flatnonzero(away & (group == r))
                y = self.global_mean + (g[rows] - self.global_mean) @ self.rotations[r].T
                g[rows] = y / np.linalg.norm(y, axis=1, keepdims=True)
        entries = self.asmk_entries(drawn, counts) if self.local and self.codebook is not None else None
        return Part(metadata=md, counts=counts, keypoints=kp, global_vectors=g, local_codes=codes, asmk_entries=entries)

    def asmk_entries(self, drawn: np.ndarray, counts: np.ndarray):
        """(image, word, signature) of the images whose codes are ``self.pool[drawn]``: a word
        met once keeps its code's signature; codes sharing a word are aggregated as a build does."""
        from delg_geo.index.asmk import aggregate

        cb = self.codebook
        img = np.repeat(np.arange(len(counts)), counts)
        key = img * cb.size + self.pool_words[drawn]
        order = np.argsort(key, kind="stable")
        ks = key[order]
        first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]])) if len(ks) else np.zeros(0, np.int64)
        size = np.diff(np.concatenate([first, [len(ks)]]))
        sigs = self.pool_sigs[drawn[order[first]]]
        multi = size > 1
        if multi.any():
            rows = order[np.repeat(multi, size)]  # every code of a shared word, in key order
            _, _, agg = aggregate(cb, self.codec.decode(self.pool[drawn[rows]]), self.pool_words[drawn[rows]], img[rows])
            sigs[multi] = agg
        return ks[first] // cb.size, ks[first] % cb.size, sigs


# -- the query process ----------------------------------------------------------------------------

def query_worker(index: Path, queries: Path, images: Path | None, top_k: int, limit: int, local_top_k: int | None = None) -> dict:
    """Runs in its own process: every query one at a time, then this process's peak RSS."""
    from delg_geo.core.geo import haversine_km
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from delg_geo.evaluation.queries import read_queries

    items, skipped = read_queries(queries, images)
    if not items:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise SystemExit(f"no query of {queries} could be read{first}; --images is the folder its paths are relative to")
    if limit:
        items = items[:limit]
    t0 = time.perf_counter()
    geo = Geolocator.from_index(index, config=LocateConfig(top_k=top_k, local_top_k=local_top_k, places=False), device="cpu")
    open_s = time.perf_counter() - t0
    geo.locate(items[0].path)  # warm-up (TensorFlow builds its graphs on the first call)
    rows = []
    for it in items:
        t = time.perf_counter()
        p = geo.locate(it.path)
        total = (time.perf_counter() - t) * 1e3
        err = float(haversine_km(it.lat, it.lon, p.lat, p.lon))
        rows.append(dict(image=str(it.path), error_km=err, method=p.method, neighbour=p.neighbour.id,
                         total_ms=total, **{f"{k}_ms": v for k, v in p.timings_ms.items()}))
    return dict(open_s=open_s, peak_rss_gb=peak_rss_kb() / 1024**2, rows=rows, images=len(geo.index))


def peak_rss_kb() -> int:
    """This process's own peak resident memory. Linux's ``VmHWM`` starts afresh at exec, while
    ``ru_maxrss`` keeps the forking parent's size (the bench's parent holds the distractor
    generator: up to 1.5 GB that the query process never had)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_queries(index: Path, args, label: str) -> dict:
    local_k = args.top_k if args.local_top_k is None else args.local_top_k
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--index", str(index), "--queries", str(args.queries),
           "--top-k", str(args.top_k), "--local-top-k", str(local_k), "--limit", str(args.limit), "--distractors", "0",
           "--out", str(args.out)]
    if args.images:
        cmd += ["--images", str(args.images)]
    log(f"[{label}] querying {index} one photo at a time in a separate process")
    t = time.perf_counter()
    # one BLAS thread: verification already runs two candidates at a time, and OpenBLAS's own
    # threads busy-wait on a shared machine (68.8 against 11.3 ms a candidate, measured here at load 15)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"the query process failed ({res.returncode}) on {index}")
    d = json.loads(res.stdout.strip().splitlines()[-1])
    d["wall_s"] = time.perf_counter() - t
    # every query's answer, for diagnosis: OUT/queries-without.csv and OUT/queries-with.csv
    name = "without" if label.startswith("without") else "with"
    pd.DataFrame(d["rows"]).to_csv(Path(args.out) / f"queries-{name}.csv", index=False)
    return d


def summarise(d: dict, n_real: int, radius_km: float = 0.1) -> dict:
    r = pd.DataFrame(d["rows"])
    return dict(queries=len(r), accuracy_at_100m=float((r.error_km <= radius_km).mean()),
                answered_by_distractor=float((r.neighbour >= n_real).mean()),
                median_error_m=float(r.error_km.median() * 1000), verified=float((r.method == "verified").mean()),
                query_ms_p50=float(r.total_ms.median()), query_ms_p95=float(r.total_ms.quantile(0.95)),
                extract_ms_p50=float(r.extract_ms.median()), search_ms_p50=float(r.search_ms.median()),
                search_ms_p95=float(r.search_ms.quantile(0.95)), verify_ms_p50=float(r.verify_ms.median()),
                peak_rss_gb=float(d["peak_rss_gb"]), open_s=float(d["open_s"]))


def carry_calibration(base: Path, target: Path) -> bool:
    """Give the copy with distractors the real index's calibration (rule and confidence map), so
    that both runs answer the same way; False when the real index has none in date."""
    from delg_geo.retrieval.calibrate import load_index_calibration, write_calibration
    from delg_geo.index.geo_index import GeoIndex

    cal = load_index_calibration(GeoIndex(base, device="cpu", check_files=False))
    if cal is None:
        return False
    write_calibration(target, cal)
    return True


def index_bytes(index: Path) -> int:
    from delg_geo.index.geo_index import MANIFEST, read_manifest

    m = read_manifest(index)
    return sum(m.files.values()) + (index / MANIFEST).stat().st_size


# -- main -----------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True, help="a real index (Venice)")
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None, help="folder the queries' paths are relative to")
    ap.add_argument("--distractors", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    ap.add_argument("--cells", type=Path, default=DEFAULT_CELLS, help="MP-16 S2 cells (cells_50_1000.csv)")
    ap.add_argument("--chunk", type=int, default=5000, help="distractors generated and written at a time")
    ap.add_argument("--local-pool", type=int, default=4_000_000, help="synthetic local descriptors to draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distractor-model", default="look-alike", choices=DISTRACTOR_MODELS,
                    help="look-alike (default): every distractor drawn like the index's photos; elsewhere: "
                         "those outside the collection's area drawn like another place")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--local-top-k", type=int, default=None, help="candidates the ASMK inverted file adds (default: as many as --top-k; 0: none)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N queries")
    ap.add_argument("--index-type", default="auto", help="auto (exact up to 100k images, IVF-PQ above), flat, ivfpq, hnsw")
    ap.add_argument("--max-disk-gb", type=float, default=40.0, help="above this, distractors get global descriptors only")
    ap.add_argument("--global-only", action="store_true", help="distractors without local features")
    ap.add_argument("--keep", action="store_true", help="keep the index with distractors (default: removed at the end)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(query_worker(args.index, args.queries, args.images, args.top_k, args.limit, args.local_top_k)))
        return {}

    from delg_geo.index.geo_index import read_manifest
    from index_builder.assemble import CompactOptions, ModelInfo, assemble_index, compact_index

    args.out.mkdir(parents=True, exist_ok=True)
    m = read_manifest(args.index)
    base = args.index
    if m.format_version < 2:
        base = args.out / "base"
        if not (base / "manifest.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            log(f"{args.index} is format {m.format_version}: converting it to the compact format in {base}")
            compact_index(args.index, base, log=log)
        m = read_manifest(base)
    n_real = m.num_images
    per_image = index_bytes(base) / n_real
    local = not args.global_only and args.distractors * per_image <= args.max_disk_gb * 1e9
    if not local:
        log(f"{args.distractors} distractors with local features would take {args.distractors * per_image / 1e9:.0f} GB "
            f"(over --max-disk-gb {args.max_disk_gb:g}, or --global-only): global descriptors only")

    without = summarise(run_queries(base, args, "without distractors"), n_real)

    t0 = time.perf_counter()
    target = args.out / f"index-{args.distractors}"
    if target.exists():
        shutil.rmtree(target)
    cells = read_cells(args.cells)
    codebook = None
    if local and m.asmk:  # the codebook a build of this many images would fit, on the real photos' features
        from delg_geo.index.store import LocalCodec
        from index_builder.assemble import asmk_sample_size, asmk_words_for, fit_codebook, stored_feature_sample

        o = CompactOptions(seed=args.seed)
        words = asmk_words_for(n_real + args.distractors, int(m.local.get("max_features", 500)), o)
        sample = stored_feature_sample(base, LocalCodec.load(base / "local_codec.npz"), asmk_sample_size(words, o), args.seed)
        codebook = fit_codebook(sample, words, o, log)
    gen = Distractors(base, cells, args.distractors, args.chunk, args.seed, local, args.local_pool, args.distractor_model,
                      codebook=codebook)
    log(f"adding {args.distractors} distractors in {len(gen)} chunks of {args.chunk} to a copy of {base}")
    model = ModelInfo(m.model_id, m.model_fingerprint, m.local_dim, False, m.model_config,
                      m.local_features, m.local_fingerprint, m.local_config)  # queries keep the index's --local
    opts = CompactOptions(index_type=args.index_type, max_local=int(m.local.get("max_features", 500)), seed=args.seed)
    src = dict(distractors=args.distractors, local_features=local, cells=str(args.cells), seed=args.seed,
               distractor_model=args.distractor_model)
    mw = assemble_index(target, gen.loaders(), model, options=opts, base=base, skipped=m.skipped,
                        sources=m.sources + [src], created=m.created, log=log, progress=not args.json, codebook=codebook)
    carried = carry_calibration(base, target)
    build_s = time.perf_counter() - t0
    build_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # this process: generation and assembly
    total_bytes = index_bytes(target)

    with_d = summarise(run_queries(target, args, f"with {args.distractors} distractors"), n_real)
    out = dict(
        distractors=args.distractors,
        images=mw.num_images,
        real_images=n_real,
        bytes_per_image=round(total_bytes / mw.num_images, 1),
        index_bytes=total_bytes,
        build_s=round(build_s, 1),
        build_peak_rss_gb=round(build_rss_gb, 3),
        peak_rss_gb=round(with_d["peak_rss_gb"], 3),
        search_ms_p50=round(with_d["search_ms_p50"], 2),
        query_ms_p50=round(with_d["query_ms_p50"], 1),
        accuracy_at_100m=round(with_d["accuracy_at_100m"], 4),
        accuracy_at_100m_without=round(without["accuracy_at_100m"], 4),
        distractor_local_features=local,
        distractor_model=args.distractor_model,
        calibration="carried from the real index" if carried else "none (the default rule in both runs)",
        asmk=bool(mw.asmk),
        index_type=mw.index_type,
        search=mw.search,
        local=mw.local,
        with_distractors={k: round(v, 4) for k, v in with_d.items()},
        without_distractors={k: round(v, 4) for k, v in without.items()},
        bytes_per_image_without=round(per_image, 1),
    )
    if not args.keep:
        shutil.rmtree(target, ignore_errors=True)
    if not args.json:
        for k, v in out.items():
            if not isinstance(v, dict):
                print(f"{k}: {v}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

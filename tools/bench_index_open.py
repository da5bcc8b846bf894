"""What the integrity checks add when an index is opened for querying (issue 11).

    python tools/bench_index_open.py --index INDEX_DIR [--repeat 3] [--json]
    python tools/bench_index_open.py --synthesize 1000000 --out DIR     # a synthetic index to time

Times, in ms (median of ``--repeat`` runs, files in the page cache): opening the index with every
check, and each check on its own (checksums of metadata.csv and the files up to 64 MB, metadata
value ranges, the FAISS sample, the offsets) plus the per-candidate local-feature guard over 100
candidates, against verifying the same 100 candidates in the same run (``guard_vs_verify``). ``--synthesize N`` writes an index of N images with realistic metadata, a 64-D flat
FAISS index, 8 local features per image (sparse files) and a manifest with sizes and checksums:
enough to time the checks at a size this machine cannot extract.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ms(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 1)


def measure(index_dir: Path, repeat: int = 3) -> dict:
    import pandas as pd

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.index.integrity import check_metadata, faiss_problem, file_problem

    idx = GeoIndex(index_dir, device="cpu")  # warms the page cache
    m = idx.manifest
    out = {"index": str(index_dir), "num_images": len(idx),
           "bytes": {k: int(v) for k, v in m.files.items()}}
    out["open_with_checks_ms"] = _ms(lambda: GeoIndex(index_dir, device="cpu"), repeat)
    out["open_without_file_checksums_ms"] = _ms(lambda: GeoIndex(index_dir, device="cpu", check_files=False), repeat)
    out["checksums_on_open_ms"] = _ms(
        lambda: [file_problem(index_dir, n, s, m.checksums.get(n), full=False) for n, s in m.files.items()], repeat)
    out["read_metadata_csv_ms"] = _ms(
        lambda: pd.read_csv(index_dir / "metadata.csv", keep_default_na=False, na_values=[""]), repeat)
    out["metadata_ranges_ms"] = _ms(lambda: check_metadata(idx.metadata, "metadata.csv"), repeat)
    cpu = idx.faiss_index  # opened on the CPU above
    out["faiss_sample_ms"] = _ms(lambda: faiss_problem(cpu, m.search_dim, index_dir / "global_raw.npy", idx.whitening), repeat)
    out["reference_norm_ms"] = _ms(lambda: (setattr(idx, "_norm_ref", None), idx.local_norm_ref), repeat)
    ids = np.linspace(0, len(idx) - 1, min(100, len(idx))).astype(int)
    feats = [idx.local_features(int(i)) for i in ids]
    out["candidate_guard_100_ms"] = _ms(lambda: [idx.candidate_problem(int(i), *f) for i, f in zip(ids, feats)], repeat)
    from delg_geo.retrieval.verify import VerifyConfig, verify_pair

    vc = VerifyConfig()
    q = feats[len(feats) // 2]
    out["verify_same_100_ms"] = _ms(lambda: [verify_pair(q[0], q[1], f[0], f[1], vc, idx.image_size(int(ids[0])),
                                                         idx.image_size(int(i))) for i, f in zip(ids, feats)], repeat)
    out["guard_vs_verify"] = round(out["candidate_guard_100_ms"] / max(out["verify_same_100_ms"], 1e-9), 4)
    out["verify_all_files_ms"] = _ms(
        lambda: [file_problem(index_dir, n, s, m.checksums.get(n), full=True) for n, s in m.files.items()], 1)
    return out


def synthesize(n: int, out: Path, dim: int = 64, per_image: int = 8, seed: int = 0) -> Path:
    """A synthetic index of ``n`` images (see the module docstring)."""
    import faiss
    import pandas as pd

    from delg_geo.index.geo_index import Manifest, now_iso, write_atomic
    from delg_geo.index.integrity import file_checksum
    from delg_geo.index.whitening import Whitening

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    md = pd.DataFrame({
        "id": np.arange(n),
        "image": [f"{i // 1000:04d}/{i}.jpg" for i in range(n)],
        "path": [f"/data/placing/{i // 1000:04d}/{i}.jpg" for i in range(n)],
        "lat": np.round(rng.uniform(-60, 70, n), 6),
        "lon": np.round(rng.uniform(-180, 180, n), 6),
        "width": rng.integers(300, 1025, n),
        "height": rng.integers(300, 1025, n),
    })
    md.to_csv(out / "metadata.csv", index=False)
    g = rng.standard_normal((n, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    np.save(out / "global_raw.npy", g)
    fidx = faiss.IndexFlatIP(dim)
    fidx.add(g)
    faiss.write_index(fidx, str(out / "global.faiss"))
    del fidx
    Whitening.identity(dim).save(out / "whitening.npz")
    offsets = np.arange(0, (n + 1) * per_image, per_image, dtype=np.int64)
    np.save(out / "local_offsets.npy", offsets)
    m_total = n * per_image
    kp = np.lib.format.open_memmap(out / "local_keypoints.npy", "w+", np.float32, (m_total, 2))
    desc = np.lib.format.open_memmap(out / "local_descriptors.npy", "w+", np.float16, (m_total, 112))
    sc = np.lib.format.open_memmap(out / "local_scores.npy", "w+", np.float16, (m_total,))
    step = max(1, n // 2000)  # fill a spread subset (sparse files elsewhere: zeros on disk)
    d = rng.standard_normal((per_image, 112)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    for i in range(0, n, step):
        a = i * per_image
        kp[a:a + per_image] = 100.0
        desc[a:a + per_image] = d
    for i in np.unique(np.linspace(0, n - 1, 16).astype(int)):  # the rows the norm reference samples
        a = i * per_image
        kp[a:a + per_image] = 100.0
        desc[a:a + per_image] = d
    sc[:] = 0
    for arr in (kp, desc, sc):
        arr.flush()
    del kp, desc, sc
    pd.DataFrame(columns=["row", "image", "reason"]).to_csv(out / "skipped.csv", index=False)
    names = ["metadata.csv", "global_raw.npy", "global.faiss", "whitening.npz", "local_offsets.npy",
             "local_keypoints.npy", "local_descriptors.npy", "local_scores.npy", "skipped.csv"]
    files = {k: (out / k).stat().st_size for k in names}
    man = Manifest(model_id="synthetic", model_fingerprint="0" * 64, global_dim=dim, search_dim=dim, local_dim=112,
                   num_images=n, num_local_features=m_total, index_type="flat",
                   whitening={"kind": "identity", "dim": dim}, files=files,
                   checksums={k: file_checksum(out / k) for k in names}, created=now_iso(), updated=now_iso())
    write_atomic(out / "manifest.json", man.to_json())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path)
    ap.add_argument("--synthesize", type=int, default=0, metavar="N")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.synthesize:
        if a.out is None:
            ap.error("--synthesize needs --out DIR")
        t = time.perf_counter()
        synthesize(a.synthesize, a.out)
        print(f"wrote {a.out} ({a.synthesize} images) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if a.index is None:
            a.index = a.out
    if a.index is None:
        ap.error("--index DIR (or --synthesize N --out DIR)")
    res = measure(a.index, a.repeat)
    print(json.dumps(res) if a.json else json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

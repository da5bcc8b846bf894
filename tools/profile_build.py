"""Profile a command (by default a small `delg-geo index build`) with `perf record -g`; print where the CPU time goes.

    python tools/profile_build.py [--n 20] [--out profile.json] [--label after] [-- CMD ...]

Without a command after ``--``, it builds an index of the first ``--n`` rows of the Venice
``reference.csv`` (``index build --no-calibrate --json --overwrite``, default local features) in
a temporary folder; with ``--steady`` it profiles the extraction alone, in steady state: ``--n``
photos through ``iter_extract`` with the default extractor, after a warm-up on 8. Samples are counted where they land (self time, ``--no-children``), for
the whole process and for TensorFlow's compute threads (``tf_Compute``) alone, and grouped:
the kernel (page faults and page zeroing, munmap and the rest), pooling, convolutions and
matrix products, memmove/memcpy, the Python interpreter, OpenBLAS, and the rest. oneDNN's JIT
code is named through its perf map (``ONEDNN_JIT_PROFILE=2``). Needs `perf` (Debian:
``apt-get install linux-perf``) and the right to profile (root, or perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "venice"

KERNEL_FAULTS = re.compile(r"clear_page|do_anonymous_page|fault|alloc_pages|get_page_from_freelist|folio|memcg|lru|rmqueue|zero")
KERNEL_UNMAP = re.compile(r"unmap|zap_|tlb|free_pages|free_unref|release_pages|__free|vm_area|mmap|do_vmi")
GROUPS = [
    ("pooling (max and average)", re.compile(r"jit_uni_pool|MaxPool|AvgPool|Pooling|pooling_fwd|SpatialMaxPool")),
    ("convolutions and matrix products",
     re.compile(r"brgemm|gemm|Gemm|convolution|Conv2D|MklConv|inner_product|matmul|MatMul|Contraction|jit_avx512_core_.*conv|brg_")),
    ("memmove / memcpy / memset", re.compile(r"memmove|memcpy|memset")),
]


def _classify(dso: str, sym: str) -> str:
    if "kernel.kallsyms" in dso:
        if KERNEL_FAULTS.search(sym):
            return "kernel: page faults and zeroing"
        if KERNEL_UNMAP.search(sym):
            return "kernel: munmap and freeing"
        return "kernel: other"
    for name, rx in GROUPS:
        if rx.search(sym):
            return name
    if dso.startswith("[JIT]"):
        return "JIT code not named"
    if "libpython" in dso or dso == "python":
        return "Python interpreter"
    if "openblas" in dso.lower():
        return "OpenBLAS (NumPy)"
    if "libc.so" in dso:
        return "libc (malloc, ...)"
    return "other"


def _report(data: Path, comm: str | None = None) -> dict:
    cmd = ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none",
           "--percent-limit", "0"]
    if comm:
        cmd += ["--comms", comm]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    shares: dict[str, float] = {}
    top = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s+\[([.k])\]\s+(.*)$", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2).strip(), m.group(4).strip()
        if "kernel.kallsyms" not in dso and m.group(3) == "k":
            dso = "[kernel.kallsyms]"
        group = _classify(dso, sym)
        shares[group] = shares.get(group, 0.0) + pct
        if len(top) < 12:
            top.append(dict(share=pct, dso=dso, symbol=sym[:120]))
    total = sum(shares.values()) or 1.0
    out = {k: round(100 * v / total, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    out["kernel (all)"] = round(sum(v for k, v in out.items() if k.startswith("kernel:")), 1)
    return dict(shares_percent=out, top_symbols=top)


def profile(cmd: list[str], label: str, cwd: Path = REPO, env: dict | None = None, freq: int = 499,
            data: Path | None = None) -> dict:
    """Run ``cmd`` under ``perf record -g`` and return its shares, wall time and rusage (``data``: keep perf.data there)."""
    if shutil.which("perf") is None:
        raise SystemExit("perf not found: apt-get install linux-perf")
    with tempfile.TemporaryDirectory() as tmp:
        data = data or Path(tmp) / "perf.data"
        env = dict(os.environ if env is None else env, ONEDNN_JIT_PROFILE="2", DNNL_JIT_PROFILE="2")
        t0 = time.perf_counter()
        r0 = os.times()
        p = subprocess.run(["perf", "record", "-F", str(freq), "-g", "-o", str(data), "--", *cmd], cwd=cwd, env=env,
                           capture_output=True, text=True)
        r1 = os.times()
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"profiled command failed ({p.returncode}): {p.stderr[-2000:]}")
        user, system = r1.children_user - r0.children_user, r1.children_system - r0.children_system
        out = dict(label=label, command=" ".join(cmd), wall_s=round(wall, 1), cpu_user_s=round(user, 1),
                   cpu_sys_s=round(system, 1), kernel_share_of_cpu_time=round(system / max(user + system, 1e-9), 3),
                   whole_process=_report(data), tensorflow_threads=_report(data, "tf_Compute"))
        try:
            out["build"] = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    return out


def build_command(data: Path, n: int, index: Path, extra: list[str]) -> list[str]:
    import pandas as pd

    meta = index.parent / f"ref{n}.csv"
    pd.read_csv(data / "reference.csv").iloc[:n].to_csv(meta, index=False)
    return [sys.executable, "-m", "delg_geo", "index", "build", str(data), "--metadata", str(meta), "--index", str(index),
            "--no-calibrate", "--json", "--overwrite", *extra]


def _extract_loop(data: Path, n: int) -> dict:
    """The process ``--steady`` profiles: set up as ``index build`` is, warm up, then extract ``n`` photos."""
    import pandas as pd

    try:  # absent in older checkouts
        from delg_geo.core.memory import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    from delg_geo.core.runtime import configure_for_throughput

    configure_for_throughput()
    from delg_geo.features.extract import iter_extract
    from delg_geo.features.models import get_extractor

    paths = [str(data / p) for p in pd.read_csv(data / "reference.csv").image.iloc[:n]]
    ext = get_extractor(None, local="aliked-n16")
    list(iter_extract(paths[:8], ext))
    c0 = time.process_time()
    ok = sum(r.ok for r in iter_extract(paths, ext))
    out = dict(images=len(paths), ok=ok, cpu_s_per_image=round((time.process_time() - c0) / len(paths), 3))
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--label", default="")
    ap.add_argument("--build-option", action="append", default=[], help="extra `index build` option (repeat)")
    ap.add_argument("--out", type=Path, help="also write the result here (JSON)")
    ap.add_argument("--cwd", type=Path, default=REPO, help="run in this checkout (for example an older commit's)")
    ap.add_argument("--perf-data", type=Path, help="keep perf.data here")
    ap.add_argument("--report-only", action="store_true", help="only summarise an existing --perf-data")
    ap.add_argument("--steady", action="store_true", help="profile steady-state extraction, not a whole build")
    ap.add_argument("--extract-loop", action="store_true", help=argparse.SUPPRESS)  # the profiled process of --steady
    args = ap.parse_args(argv)
    if args.extract_loop:
        return _extract_loop(args.data, args.n)
    if args.steady and cmd is None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--extract-loop", "--data", str(args.data), "--n", str(args.n)]
    if args.report_only:
        out = dict(label=args.label, whole_process=_report(args.perf_data), tensorflow_threads=_report(args.perf_data, "tf_Compute"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if cmd is None:
                cmd = build_command(args.data, args.n, Path(tmp) / "index", args.build_option)
            env = dict(os.environ, PYTHONPATH=str(args.cwd.resolve())) if args.steady else None  # that checkout's package
            out = profile(cmd, args.label, cwd=args.cwd, env=env, data=args.perf_data)
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

"""NpyRows: a query's reads of the big index files, without growing resident memory (issue 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delg_geo.index.rowfile import NpyRows

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_rows_and_take_equal_numpy(tmp_path, version):
    x = np.random.default_rng(0).integers(-128, 127, (1000, 48), dtype=np.int8)
    p = tmp_path / "codes.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array(f, x, version=version)
    r = NpyRows(p)
    assert len(r) == 1000 and r.shape == (1000, 48) and r.dtype == np.int8
    np.testing.assert_array_equal(r.rows(10, 25), x[10:25])
    np.testing.assert_array_equal(r.rows(990, 2000), x[990:])  # clipped at the end
    assert r.rows(5, 5).shape == (0, 48)
    idx = np.array([0, 1, 2, 7, 9, 10, 999])
    np.testing.assert_array_equal(r[idx], x[idx])
    assert r[np.array([], np.int64)].shape == (0, 48)


def test_a_truncated_file_is_a_clear_error(tmp_path):
    p = tmp_path / "g.npy"
    np.save(p, np.ones((100, 16), np.float16))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(OSError, match=r"g.npy: short read at byte .* \(row 90\)"):
        NpyRows(p).rows(90, 100)


_RSS = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from delg_geo.index.rowfile import NpyRows
path, how = sys.argv[1], sys.argv[2]
src = NpyRows(path) if how == "pread" else np.load(path, mmap_mode="r")
rows = np.random.default_rng(1).integers(0, 100_000, 20_000)
def rss_kb():  # resident now (ru_maxrss would include the parent's size at fork)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
before = rss_kb()
total = 0
for i in rows:
    total += int(np.asarray(src.rows(i, i + 1) if how == "pread" else src[i : i + 1]).sum())
print((rss_kb() - before) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory as Linux reports it")
def test_resident_memory_stays_flat_where_a_memory_map_grows(tmp_path):
    p = tmp_path / "store.npy"
    np.save(p, np.ones((100_000, 1024), np.int8))  # 100 MB: 20,000 random rows touch most pages
    grow = {}
    for how in ("pread", "mmap"):
        out = subprocess.run([sys.executable, "-c", _RSS.format(repo=str(REPO)), str(p), how],
                             capture_output=True, text=True, check=True).stdout
        grow[how] = float(out.strip().splitlines()[-1])
    assert grow["mmap"] > 30, grow  # the map's touched pages count as the process's own
    assert grow["pread"] < 10, grow

"""metadata.csv held as arrays with rows parsed on demand (issue 9: query memory at 5 M photos)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from delg_geo.core.errors import IndexFormatError
from delg_geo.index.metadata_table import MetadataTable


def _frame(n: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(dict(
        image=[f"dir {i}/photo,{i}.jpg" if i % 7 == 0 else f"d/{i}.jpg" for i in range(n)],  # commas: quoted
        path=[f"/data/d/{i}.jpg" for i in range(n)],
        lat=np.round(rng.uniform(-80, 80, n), 6), lon=np.round(rng.uniform(-170, 170, n), 6),
        width=rng.integers(100, 4000, n), height=rng.integers(100, 4000, n),
        owner=[f"user \"{i % 3}\"" for i in range(n)],  # quotes inside a field
    ))


@pytest.mark.parametrize("variant", ["plain", "crlf", "no-final-newline", "line-break-in-name"])
def test_rows_read_on_demand_equal_pandas(tmp_path, variant):
    df = _frame()
    if variant == "line-break-in-name":
        df.loc[3, "image"] = "two\nlines.jpg"
    p = tmp_path / "metadata.csv"
    text = df.to_csv(index=False, lineterminator="\r\n" if variant == "crlf" else "\n")
    if variant == "no-final-newline":
        text = text.rstrip("\n")
    p.write_bytes(text.encode())
    t = MetadataTable(p)
    assert len(t) == len(df)
    np.testing.assert_array_equal(t.lats, df.lat.to_numpy())
    np.testing.assert_array_equal(t.sizes, df[["width", "height"]].to_numpy())
    for i in (0, 3, 7, 14, len(df) - 1):
        r = t.row(i)
        assert r["image"] == df.image[i] and r["owner"] == df.owner[i] and r["path"] == df.path[i]
        assert float(r["lat"]) == df.lat[i] and int(r["width"]) == df.width[i]
    # line-indexed unless a quoted field holds a line break (then the text columns stay in memory)
    assert (t._starts is None) == (variant == "line-break-in-name")
    assert t._frame is None  # the whole frame is only read when asked for
    assert t.frame.image.tolist() == df.image.tolist()
    with pytest.raises(IndexError):
        t.row(len(df))


def test_bad_values_and_missing_columns_are_refused_with_the_line(tmp_path):
    df = _frame()
    df["lat"] = df["lat"].astype(object)
    df.loc[9, "lat"] = "north"
    p = tmp_path / "metadata.csv"
    df.to_csv(p, index=False)
    with pytest.raises(IndexFormatError, match=r"line 11: 'north' in column lat"):
        MetadataTable(p)
    df.drop(columns=["path"]).assign(lat=0.0).to_csv(p, index=False)
    with pytest.raises(IndexFormatError, match="lacks the column"):
        MetadataTable(p)


def test_a_query_never_loads_the_table_of_names(tmp_path):
    """Opening an index and answering queries keeps only arrays; names come from the file."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_extractor import FakeExtractor, fake_collection

    from delg_geo.index.geo_index import GeoIndex
    from delg_geo.retrieval.locate import Geolocator, LocateConfig
    from index_builder.build import BuildOptions, build_index

    # commas in the names: they are quoted in metadata.csv
    images, csv = fake_collection(tmp_path, [f"photo, number {k}.png" for k in range(12)])
    build_index(images, tmp_path / "index", csv, extractor=FakeExtractor(),
                options=BuildOptions(progress=False), log=lambda m: None)
    idx = GeoIndex(tmp_path / "index", device="cpu")
    geo = Geolocator(idx, FakeExtractor(), LocateConfig(top_k=5, places=False, num_alternatives=3))
    md = pd.read_csv(tmp_path / "index" / "metadata.csv")
    for k in (3, 8):
        p = geo.locate(images / f"photo, number {k}.png")
        assert p.neighbour.image == md.image[p.neighbour.id] == f"photo, number {k}.png"
        assert p.alternatives and [a.image for a in p.alternatives] == [md.image[a.id] for a in p.alternatives]
    assert idx.table._frame is None  # no table of Python strings was read

"""Benchmark query sets: generic CSV, MediaEval Placing 2016 + YFCC100M, Im2GPS / Im2GPS3k."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from conftest import shared_path
from delg_geo.core.errors import MetadataError
from delg_geo.evaluation.queries import QueryItem, detect_query_format, read_queries


def _jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 120, 10)).save(path, format="JPEG")
    return path


def _why(skipped) -> dict:
    return {s.row: (s.image, s.reason) for s in skipped}


# ------------------------------------------------------------------ generic CSV


def test_generic_csv(tmp_path):
    _jpg(tmp_path / "q" / "a.jpg")
    _jpg(tmp_path / "q" / "sub" / "b.jpg")
    f = tmp_path / "q" / "queries.csv"
    f.write_text(
        "image,lat,lon,flickr_photo_id\n"
        "a.jpg,45.43,12.33,1\n"  # 2 ok
        "missing.jpg,45.0,12.0,2\n"  # 3 image missing
        "sub/b.jpg,91.5,12.0,3\n"  # 4 bad latitude
        "sub/b.jpg,-33.5,151.25,4\n"  # 5 ok
    )
    assert detect_query_format(f) == "csv"
    items, skipped = read_queries(f)  # images_dir defaults to the CSV's folder
    assert items == [
        QueryItem("a.jpg", (tmp_path / "q" / "a.jpg").resolve(), 45.43, 12.33),
        QueryItem("sub/b.jpg", (tmp_path / "q" / "sub" / "b.jpg").resolve(), -33.5, 151.25),
    ]
    why = _why(skipped)
    assert sorted(why) == [3, 4]
    assert why[3][0] == "missing.jpg" and "not found" in why[3][1]
    assert why[4][0] == "sub/b.jpg" and "latitude" in why[4][1] and "out of range" in why[4][1]
    assert read_queries(f, tmp_path / "q", fmt="csv") == (items, skipped)


# ------------------------------------------------------------------ Placing 2016 + YFCC100M

H = ["0a1b2c3d4e5f60718293a4b5c6d7e8f9", "ffeeddccbbaa99887766554433221100",
     "1234567890abcdef1234567890abcdef", "00000000aaaabbbbccccddddeeeeffff"]  # fmt: skip


def _yfcc25(n: int, photo_id: str, hash_: str, lat: str, lon: str) -> str:
    # yfcc100m_dataset: line no., photo id, hash, ..., longitude (12), latitude (13), ...
    f = [str(n), photo_id, hash_, "1@N00", "nick", "2010-05-01 10:00:00.0", "1272700000", "cam",
         "t", "d", "tags", "", lon, lat, "16", "page", "dl", "lic", "licurl", "1", "1", "s", "s",
         "jpg", "0"]  # fmt: skip
    return "\t".join(f)


def test_placing2016_with_yfcc_metadata(tmp_path):
    images = tmp_path / "placing_test"
    for pid in ("1001", "1003", "1004"):
        _jpg(images / f"{pid}.jpg")
    test_list = tmp_path / "mediaeval2016_placing_test_photo"
    test_list.write_text(
        f"1001\t{H[0]}\n"  # 1 ok
        f"1002\t{H[1]}\n"  # 2 image missing
        f"1003\t{H[2]}\n"  # 3 bad latitude in the metadata
        f"1004\t{H[3]}\n"  # 4 ok
    )
    meta = tmp_path / "yfcc100m_dataset"
    meta.write_text(
        "\n".join(
            [
                _yfcc25(1, "1001", H[0], "48.8584", "2.2945"),
                _yfcc25(2, "1002", H[1], "10.0", "20.0"),
                _yfcc25(3, "1003", H[2], "123.0", "20.0"),
                _yfcc25(4, "1004", H[3], "-22.95", "-43.21"),
            ]
        )
        + "\n"
    )
    assert detect_query_format(test_list) == "placing"
    items, skipped = read_queries(test_list, images, yfcc_metadata=meta)
    # longitude precedes latitude in the YFCC100M rows: not swapped here
    assert items == [
        QueryItem("1001", (images / "1001.jpg").resolve(), 48.8584, 2.2945),
        QueryItem("1004", (images / "1004.jpg").resolve(), -22.95, -43.21),
    ]
    why = _why(skipped)
    assert sorted(why) == [2, 3]
    assert why[2][0] == "1002" and "no image file 1002.jpg" in why[2][1]
    assert why[3][0] == "1003" and "latitude" in why[3][1]
    assert read_queries(test_list, images, fmt="placing", yfcc_metadata=meta) == (items, skipped)
    with pytest.raises(MetadataError, match="YFCC100M metadata"):
        read_queries(test_list, images)


# ------------------------------------------------------------------ Im2GPS / Im2GPS3k

_IM2GPS_HEADER = (
    "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"
)


def test_im2gps_fixture(tmp_path):
    images = tmp_path / "im2gps"
    _jpg(images / "111_aa_1_1@N00.jpg")
    _jpg(images / "222_bb_2_2@N00.jpg")
    _jpg(images / "333_cc_3_3@N00.jpg")
    f = tmp_path / "im2gps_places365.csv"
    f.write_text(
        _IM2GPS_HEADER + "\n"
        "111_aa_1_1@N00.jpg,1@N00,-16.663606,145.563537,1,8,150,0.1,0.7,0.2\n"  # 2 ok
        "999_zz_9_9@N00.jpg,9@N00,31.89,-85.14,2,15,231,0.1,0.1,0.8\n"  # 3 image missing
        "222_bb_2_2@N00.jpg,2@N00,nan,10.0,2,15,231,0.1,0.1,0.8\n"  # 4 bad latitude
        "333_cc_3_3@N00.jpg,3@N00,40.0,-181.0,2,15,231,0.1,0.1,0.8\n"  # 5 bad longitude
        "111_aa_1_1@N00.jpg,1@N00,-16.663606,145.563537,1,8,150,0.1,0.7,0.2\n"  # 6 duplicate
        "../outside.jpg,1@N00,1.0,1.0,1,8,150,0.1,0.7,0.2\n"  # 7 escapes the images folder
    )
    assert detect_query_format(f) == "im2gps"
    items, skipped = read_queries(f, images)
    first = images / "111_aa_1_1@N00.jpg"
    assert items == [QueryItem("111_aa_1_1@N00.jpg", first.resolve(), -16.663606, 145.563537)]
    why = _why(skipped)
    assert sorted(why) == [3, 4, 5, 6, 7]
    missing = (images / "999_zz_9_9@N00.jpg").resolve()
    assert why[3] == ("999_zz_9_9@N00.jpg", f"image not found: {missing}")
    assert "latitude is NaN" in why[4][1]
    assert "longitude" in why[5][1] and "out of range" in why[5][1]
    assert "duplicate" in why[6][1] and "line 2" in why[6][1]
    assert "escapes" in why[7][1]
    assert read_queries(f, images, fmt="im2gps3k") == (items, skipped)
    with pytest.raises(MetadataError, match="images_dir"):
        read_queries(f)  # Im2GPS images are not distributed with the ground truth


def test_bad_inputs(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        read_queries(tmp_path / "nope.csv", tmp_path)
    with pytest.raises(MetadataError, match="unknown query format"):
        read_queries(tmp_path / "nope.csv", tmp_path, fmt="kml")
    f = tmp_path / "im2gps.csv"
    f.write_text("IMG_ID,AUTHOR,LATITUDE_X,LON\nx.jpg,a,1,2\n")
    with pytest.raises(MetadataError, match="'LAT'"):
        read_queries(f, tmp_path)
    g = tmp_path / "q.csv"
    g.write_text("image,lat,lon\n")
    with pytest.raises(MetadataError, match="yfcc_metadata"):
        read_queries(g, tmp_path, yfcc_metadata=tmp_path / "m")


@pytest.mark.shared
@pytest.mark.parametrize("name", ["im2gps_places365.csv", "im2gps3k_places365.csv"])
def test_im2gps_real_ground_truth(tmp_path, name):
    gt = shared_path("im2gps_meta", "meta", name)
    with open(gt, newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = [rows[0], rows[len(rows) // 2], rows[-1]]
    for r in pick:
        _jpg(tmp_path / r["IMG_ID"])
    assert detect_query_format(gt) == "im2gps"
    items, skipped = read_queries(gt, tmp_path)
    assert [(q.img_id, q.lat, q.lon) for q in items] == [
        (r["IMG_ID"], float(r["LAT"]), float(r["LON"])) for r in pick
    ]
    assert all(q.path == (tmp_path / q.img_id).resolve() for q in items)
    assert len(items) + len(skipped) == len(rows)
    assert all(s.reason.startswith("image not found") for s in skipped)
    assert {s.image for s in skipped} == {r["IMG_ID"] for r in rows} - {r["IMG_ID"] for r in pick}

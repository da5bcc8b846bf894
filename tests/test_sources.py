"""Reading image positions: CSV, EXIF, VPR file names, MediaEval Placing / YFCC100M."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest
from PIL import Image

from delg_geo.core.errors import MetadataError
from index_builder.sources import (
    GeoRecord,
    Skipped,
    parse_vpr_fields,
    parse_vpr_filename,
    read_csv_metadata,
    read_exif_metadata,
    read_metadata,
    read_vpr_metadata,
    read_yfcc_metadata,
    resolve_image_path,
    utm_to_latlon,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SKIP_MSG = "../shared/data not found: real-data test needs the shared data folder"


def _need(path: Path) -> Path:
    if not DATA.is_dir():
        pytest.skip(SKIP_MSG)
    if not path.exists():
        pytest.skip(f"{path} not found in ../shared/data")
    return path


def _jpg(path: Path, gps: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (8, 8), (10, 120, 200))
    fmt = {".png": "PNG", ".webp": "WEBP", ".tif": "TIFF"}.get(path.suffix.lower(), "JPEG")
    if gps:
        exif = Image.Exif()
        exif[0x0110] = "test"
        exif[0x8825] = gps
        img.save(path, format=fmt, exif=exif)
    else:
        img.save(path, format=fmt)
    return path


def _reasons(skipped: list[Skipped]) -> dict[int | None, str]:
    return {s.row: s.reason for s in skipped}


# ------------------------------------------------------------------ CSV


@pytest.fixture()
def csv_case(tmp_path):
    images = tmp_path / "images"
    _jpg(images / "a.jpg")
    _jpg(images / "b.jpg")
    _jpg(images / "sub" / "c.png")
    outside = _jpg(tmp_path / "outside.jpg")
    (images / "folder.jpg").mkdir()
    text = "\n".join(
        [
            "image,lat,lon,note",
            "a.jpg,45.0,12.0,first",  # 2 ok
            "b.jpg,NaN,12.0,x",  # 3 NaN lat
            "b.jpg,95,12.0,x",  # 4 lat out of range
            "missing.jpg,45,12,x",  # 5 missing file
            "../../x.jpg,45,12,x",  # 6 escapes
            f"{outside},45,12,x",  # 7 absolute
            "a.jpg,46,13,again",  # 8 duplicate
            'sub/c.png,-33.9,151.2,"with, comma"',  # 9 ok
            "b.jpg,abc,12,x",  # 10 non-numeric
            "b.jpg,,12,x",  # 11 missing lat
            "./b.jpg,10,200,x",  # 12 lon out of range
            "",  # 13 blank line, ignored
            "b.jpg,10,20",  # 14 ok, short row: note is empty
            "./a.jpg,1,1,x",  # 15 duplicate after normalisation
            "folder.jpg,1,1,x",  # 16 a directory
            ",1,1,x",  # 17 empty image
            "../images/sub/../b.jpg,1,1,x",  # 18 stays inside, but duplicate of b.jpg
            "../outside.jpg,1,1,x",  # 19 escapes by one level
        ]
    )
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(text + "\n")
    return csv_path, images, outside


def test_csv_valid_rows_and_reasons(csv_case):
    csv_path, images, _ = csv_case
    records, skipped = read_csv_metadata(csv_path, images)
    assert [(r.row, r.image, r.lat, r.lon) for r in records] == [
        (2, "a.jpg", 45.0, 12.0),
        (9, "sub/c.png", -33.9, 151.2),
        (14, "b.jpg", 10.0, 20.0),
    ]
    assert all(
        isinstance(r, GeoRecord) and r.path.is_absolute() and r.path.is_file() for r in records
    )
    assert records[0].path == (images / "a.jpg").resolve()
    assert records[0].extra == {"note": "first"}
    assert records[1].extra == {"note": "with, comma"}
    assert records[2].extra == {"note": ""}
    why = _reasons(skipped)
    assert sorted(why) == [3, 4, 5, 6, 7, 8, 10, 11, 12, 15, 16, 17, 18, 19]
    assert "latitude is NaN" in why[3]
    assert "latitude 95 out of range" in why[4]
    assert "file not found" in why[5]
    assert "escapes" in why[6] and "escapes" in why[19]
    assert "absolute" in why[7]
    assert "duplicate" in why[8] and "line 2" in why[8]
    assert "not a number" in why[10]
    assert "missing latitude" in why[11]
    assert "longitude 200 out of range" in why[12]
    assert "duplicate" in why[15] and "duplicate" in why[18]
    assert "not a file" in why[16]
    assert "empty image" in why[17]
    assert {s.image for s in skipped if s.row == 6} == {"../../x.jpg"}


def test_csv_allow_outside(csv_case):
    csv_path, images, outside = csv_case
    records, skipped = read_csv_metadata(csv_path, images, allow_outside=True)
    paths = {r.row: r.path for r in records}
    assert paths[7] == outside.resolve()  # absolute path accepted
    why = _reasons(skipped)
    assert "duplicate" in why[19] and "line 7" in why[19]  # ../outside.jpg is the same file
    assert "file not found" in why[6]  # ../../x.jpg accepted as a path, but does not exist


def test_csv_missing_column_names_it(tmp_path):
    (tmp_path / "m.csv").write_text("image,lat\na.jpg,1\n")
    with pytest.raises(MetadataError, match="'lon'"):
        read_csv_metadata(tmp_path / "m.csv", tmp_path)
    (tmp_path / "m2.csv").write_text("file_name,lat,lon\na.jpg,1,2\n")
    with pytest.raises(MetadataError, match="'image'"):
        read_csv_metadata(tmp_path / "m2.csv", tmp_path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MetadataError, match="empty"):
        read_csv_metadata(tmp_path / "empty.csv", tmp_path)
    with pytest.raises(MetadataError, match="not found"):
        read_csv_metadata(tmp_path / "nope.csv", tmp_path)
    with pytest.raises(MetadataError, match="images folder not found"):
        read_csv_metadata(tmp_path / "m.csv", tmp_path / "no_dir")


def test_csv_tab_aliases_bom_crlf(tmp_path):
    _jpg(tmp_path / "x.jpg")
    (tmp_path / "m.tsv").write_bytes(
        "\ufeffPath\tLatitude\tLongitude\n x.jpg \t 1.5 \t-2.5\r\n".encode("utf-8")
    )
    records, skipped = read_csv_metadata(tmp_path / "m.tsv", tmp_path)
    assert skipped == [] and [(r.image, r.lat, r.lon) for r in records] == [("x.jpg", 1.5, -2.5)]


def test_resolve_image_path(tmp_path):
    assert resolve_image_path("a/b.jpg", tmp_path)[0] == (tmp_path / "a" / "b.jpg").resolve()
    assert resolve_image_path("../b.jpg", tmp_path)[0] is None
    assert resolve_image_path("a/../../b.jpg", tmp_path)[0] is None
    assert resolve_image_path("C:\\photos\\b.jpg", tmp_path)[0] is None
    assert resolve_image_path("/etc/passwd", tmp_path)[0] is None
    assert (
        resolve_image_path("/etc/passwd", tmp_path, allow_outside=True)[0]
        == Path("/etc/passwd").resolve()
    )


# ------------------------------------------------------------------ EXIF


def test_exif_metadata(tmp_path):
    _jpg(
        tmp_path / "b" / "with_gps.JPG",
        {1: "N", 2: (45.0, 26.0, 0.0), 3: "E", 4: (12.0, 20.0, 0.0)},
    )
    _jpg(tmp_path / "a_no_gps.jpg")
    _jpg(tmp_path / "c.png", {1: "S", 2: 10.5, 3: "W", 4: 20.25})
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpeg").write_bytes(b"garbage")
    _jpg(tmp_path / ".hidden" / "h.jpg", {1: "N", 2: 1.0, 3: "E", 4: 1.0})
    _jpg(tmp_path / "._resource.jpg")
    records, skipped = read_exif_metadata(tmp_path)
    assert [(r.image, round(r.lat, 6), round(r.lon, 6)) for r in records] == [
        ("b/with_gps.JPG", round(45 + 26 / 60, 6), round(12 + 20 / 60, 6)),
        ("c.png", -10.5, -20.25),
    ]
    assert records[0].extra == {"source": "exif"}
    why = {s.image: s.reason for s in skipped}
    # every non-hidden file is indexed or listed with its reason (issue 11)
    assert set(why) == {"a_no_gps.jpg", "broken.jpeg", "notes.txt"}
    assert why["a_no_gps.jpg"] == "no EXIF GPS data (JPEG image)"
    assert why["broken.jpeg"] == why["notes.txt"] == "not an image (no image format recognised)"
    assert all(s.row is None for s in skipped)
    assert read_metadata(tmp_path, from_exif=True)[0] == records


@pytest.mark.shared
def test_exif_metadata_real():
    d = _need(DATA / "exif_gps")
    records, skipped = read_exif_metadata(d)
    # the folder's two text files are listed, not dropped silently
    assert len(records) == 9 and {(s.image, s.reason) for s in skipped} == {
        ("LICENSE_OpenSfM_BSD2.txt", "not an image (no image format recognised)"),
        ("metadata.csv", "not an image (no image format recognised)"),
    }
    assert records[0].image == "berlin/01.jpg"
    assert records[0].lat == pytest.approx(52.5189167, abs=1e-5)


# ------------------------------------------------------------------ VPR file names

PITTS = "@0584729.64@4477204.96@17@T@040.44118@-080.00093@Pitts_pano@00@@@@@@@.jpg"


def test_parse_vpr_filename():
    name = "@0543256.96@4178906.90@10@S@37.76334@-122.43328@@@@@@@@@.jpg"
    assert parse_vpr_filename(name) == (37.76334, -122.43328)
    assert parse_vpr_filename("/some/dir/" + PITTS) == (40.44118, -80.00093)
    f = parse_vpr_fields(PITTS)
    assert f["utm_zone"] == "17" and f["utm_letter"] == "T" and f["pano_id"] == "Pitts_pano"
    assert f["tile_num"] == "00" and f["convention"] == "vpr"
    for bad in [
        "photo.jpg",
        "@1@2@.jpg",
        "@0543256.96@4178906.90@10@S@95.0@-122.4@.jpg",
        "@x@y@10@S@@@.jpg",
        "@543256@4178906@99@S@@@.jpg",
        "12345.jpg",
    ]:
        assert parse_vpr_filename(bad) is None, bad


def test_vpr_lat_lon_from_utm_when_empty():
    # UTM values computed with pyproj (EPSG:32617 / 32618 / 32756) for known points
    f = parse_vpr_fields("@0584729.64@4477204.96@17@T@@@pano@.jpg")
    assert f["latlon_from_utm"] is True
    assert (f["lat"], f["lon"]) == pytest.approx((40.44118, -80.00093), abs=1e-6)
    assert utm_to_latlon(585724.6838, 4511328.0016, 18, True) == pytest.approx(
        (40.748440, -73.984559), abs=1e-7
    )
    assert utm_to_latlon(334900.2613, 6252290.5224, 56, False) == pytest.approx(
        (-33.856784, 151.215297), abs=1e-7
    )


def test_gsv_cities_filename():
    name = "Boston_0000012_2017_07_090_42.35123_-71.0621_Xj-k_1a2B3c4D5e6F7g8H9.jpg"
    assert parse_vpr_filename(name) == (42.35123, -71.0621)
    f = parse_vpr_fields(name)
    assert (
        f["city"] == "Boston"
        and f["pano_id"] == "Xj-k_1a2B3c4D5e6F7g8H9"
        and f["convention"] == "gsv-cities"
    )


def test_read_vpr_metadata_and_auto(tmp_path):
    _jpg(tmp_path / "database" / PITTS)
    _jpg(tmp_path / "database" / "@0543256.96@4178906.90@10@S@37.76334@-122.43328@@@@@@@@@.jpg")
    _jpg(tmp_path / "queries" / "Boston_0000012_2017_07_090_42.35123_-71.0621_abc.jpg")
    _jpg(tmp_path / "queries" / "plain.jpg")
    records, skipped = read_vpr_metadata(tmp_path)
    assert [r.image.split("/")[0] for r in records] == ["database", "database", "queries"]
    assert {(r.lat, r.lon) for r in records} == {
        (40.44118, -80.00093),
        (37.76334, -122.43328),
        (42.35123, -71.0621),
    }
    assert [s.image for s in skipped] == ["queries/plain.jpg"]
    assert "does not encode a position" in skipped[0].reason
    auto = read_metadata(tmp_path)
    assert [r.image for r in auto[0]] == [r.image for r in records]


def test_auto_without_metadata_asks_for_it(tmp_path):
    _jpg(tmp_path / "x.jpg")
    _jpg(tmp_path / "y.jpg")
    with pytest.raises(MetadataError, match="--metadata") as info:
        read_metadata(tmp_path)
    assert "--from-exif" in str(info.value)
    with pytest.raises(MetadataError, match="no image files"):
        read_metadata(_empty(tmp_path))
    with pytest.raises(MetadataError, match="not both"):
        read_metadata(tmp_path, metadata=tmp_path / "m.csv", from_exif=True)
    with pytest.raises(MetadataError, match="unknown metadata format"):
        read_metadata(tmp_path, fmt="kml")


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty_dir"
    d.mkdir()
    return d


# ------------------------------------------------------------------ Placing / YFCC100M

H1, H2, H3, H4 = ("0a1b2c3d4e5f60718293a4b5c6d7e8f9", "ffeeddccbbaa99887766554433221100",
                  "1234567890abcdef1234567890abcdef", "00000000aaaabbbbccccddddeeeeffff")  # fmt: skip


def _yfcc25(line_no: int, photo_id: str, hash_: str, lat: str, lon: str, marker: str = "0") -> str:
    f = [str(line_no), photo_id, hash_, "12345678@N00", "nick", "2010-05-01 10:00:00.0", "1272700000",
         "Canon+EOS", "title", "descr", "tag1,tag2", "", lon, lat, "16" if lat else "",
         f"http://www.flickr.com/photos/x/{photo_id}/", "http://farm1.staticflickr.com/1/x.jpg",
         "Attribution License", "http://creativecommons.org/licenses/by/2.0/", "1", "1", "abc", "abc",
         "jpg", marker]  # fmt: skip
    assert len(f) == 25
    return "\t".join(f)


def _yfcc23(photo_id: str, lat: str, lon: str) -> str:
    f = [photo_id, "12345678@N00", "nick", "2010-05-01 10:00:00.0", "1272700000", "Canon", "t", "d",
         "tags", "", lon, lat, "16", "page", "download", "lic", "licurl", "1", "1", "s", "s", "jpg", "0"]  # fmt: skip
    assert len(f) == 23
    return "\t".join(f)


@pytest.fixture()
def placing_case(tmp_path):
    images = tmp_path / "mp16"
    _jpg(images / "1001.jpg")
    _jpg(images / "ab" / "cd" / "1002.jpg")  # nested
    _jpg(images / "1004.jpg")
    _jpg(images / "1005.jpg")
    task = tmp_path / "mediaeval2016_placing_train_photo"
    task.write_text(
        "\n".join(
            [
                f"1001\t{H1}\t12345678@N00\t1\tsome+places",  # 1 ok
                f"1002\t{H2}\t12345678@N00\t1\t",  # 2 ok, nested file
                f"1003\t{H3}\t12345678@N00\t1\t",  # 3 no image file
                f"1004\t{H4}\t12345678@N00\t1\t",  # 4 not geotagged
                "1005\tdeadbeefdeadbeefdeadbeefdeadbeef\tu\t1\t",  # 5 not in metadata
                f"1001\t{H1}\t12345678@N00\t1\t",  # 6 duplicate
                "not-an-id\tfoo",  # 7 garbage
            ]
        )
        + "\n"
    )
    meta = tmp_path / "yfcc100m_dataset.bz2"
    meta.write_bytes(
        bz2.compress(
            (
                "\n".join(
                    [
                        _yfcc25(1, "999", "0" * 32, "1.0", "2.0"),
                        _yfcc25(2, "1001", H1, "45.4371", "12.3326"),
                        _yfcc25(3, "1002", H2, "-33.8568", "151.2153"),
                        _yfcc25(4, "1003", H3, "40.0", "-74.0"),
                        _yfcc25(5, "1004", H4, "", ""),
                    ]
                )
                + "\n"
            ).encode()
        )
    )
    return task, meta, images


def test_yfcc_placing_task_with_yfcc_metadata(placing_case):
    task, meta, images = placing_case
    records, skipped = read_yfcc_metadata(task, meta, images)
    # longitude precedes latitude in the YFCC100M metadata: check they are not swapped
    assert [(r.row, r.image, r.lat, r.lon) for r in records] == [
        (1, "1001.jpg", 45.4371, 12.3326),
        (2, "ab/cd/1002.jpg", -33.8568, 151.2153),
    ]
    assert records[0].extra == {"photo_id": "1001", "hash": H1}
    why = _reasons(skipped)
    assert sorted(why) == [3, 4, 5, 6, 7]
    assert "no image file 1003.jpg" in why[3]
    assert "not geotagged" in why[4]
    assert "not found in yfcc100m_dataset.bz2" in why[5]
    assert "duplicate" in why[6] and "line 1" in why[6]
    assert "not a YFCC100M photo id" in why[7]
    # the same through read_metadata with a (placing, yfcc) pair
    assert read_metadata(images, metadata=(task, meta))[0] == records


def test_yfcc_2014_layout_and_images_only(tmp_path):
    images = tmp_path / "imgs"
    _jpg(images / "2001.jpg")
    _jpg(images / "x" / "2002.jpg")
    _jpg(images / "holiday.jpg")
    meta = tmp_path / "yfcc100m_dataset-0"
    meta.write_text(
        "\n".join([_yfcc23("2001", "48.8584", "2.2945"), _yfcc23("2002", "51.5", "-0.12")]) + "\n"
    )
    records, skipped = read_yfcc_metadata(None, meta, images)
    assert [(r.image, r.lat, r.lon) for r in records] == [
        ("2001.jpg", 48.8584, 2.2945),
        ("x/2002.jpg", 51.5, -0.12),
    ]
    assert [s.image for s in skipped] == ["holiday.jpg"]
    # read_metadata recognises the YFCC100M metadata file itself
    assert read_metadata(images, metadata=meta)[0] == records


def test_yfcc_task_file_alone_needs_metadata(placing_case):
    task, _, images = placing_case
    with pytest.raises(MetadataError, match="YFCC100M metadata"):
        read_metadata(images, metadata=task)


def test_yfcc_bad_metadata_layout(placing_case, tmp_path):
    task, _, images = placing_case
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\td\n")
    with pytest.raises(MetadataError, match="4 fields"):
        read_yfcc_metadata(task, bad, images)


@pytest.mark.shared
def test_placing2016_medoids_real(tmp_path):
    medoids = _need(DATA / "placing_meta" / "placing2016" / "medoids.500")
    lines = medoids.read_text().split()
    wanted = [ln.split(",") for ln in lines[:3]]
    for pid, _, _ in wanted:
        _jpg(tmp_path / f"{pid}.jpg")
    records, skipped = read_yfcc_metadata(medoids, None, tmp_path)
    assert [(r.image, r.lat, r.lon) for r in records] == [
        (f"{p}.jpg", float(a), float(b)) for p, a, b in wanted
    ]
    assert len(skipped) == len(lines) - 3
    assert all("no image file" in s.reason for s in skipped)
    # auto-detected as a Placing file
    assert read_metadata(tmp_path, metadata=medoids)[0] == records


@pytest.mark.shared
def test_placing2015_ground_by_hash_real(tmp_path):
    ground = _need(DATA / "placing_meta" / "placing2015" / "ground.mobility.csv.bz2")
    with bz2.open(ground, "rt") as fh:
        rows = [next(fh).strip().split(",") for _ in range(3)]
    # a task file (photo id, hash): the first hash is written with a leading zero, as a full 32
    # hex-digit hash would be; the ground file drops it.
    task = tmp_path / "task.tsv"
    task.write_text(
        "".join(f"{5000 + i}\t{h.rjust(32, '0')}\n" for i, (h, _, _) in enumerate(rows))
    )
    images = tmp_path / "imgs"
    for i in range(2):
        _jpg(images / f"{5000 + i}.jpg")
    records, skipped = read_yfcc_metadata(task, ground, images)
    assert [(r.image, r.lat, r.lon) for r in records] == [
        (f"{5000 + i}.jpg", float(rows[i][1]), float(rows[i][2])) for i in range(2)
    ]
    assert [(s.row, s.image) for s in skipped] == [(3, "5002")]
    # ground.*.csv alone, with images named by hash
    images2 = tmp_path / "by_hash"
    _jpg(images2 / f"{rows[1][0]}.jpg")
    records, skipped = read_metadata(images2, metadata=ground)
    assert [(r.image, r.lat, r.lon) for r in records] == [
        (f"{rows[1][0]}.jpg", float(rows[1][1]), float(rows[1][2]))
    ]
    assert len(skipped) == 9674


# ------------------------------------------------------------------ real CSV


@pytest.mark.shared
def test_venice_reference_csv_real():
    venice = _need(DATA / "venice")
    records, skipped = read_csv_metadata(venice / "reference.csv", venice)
    assert len(records) == 1898 and skipped == []
    assert records[0].image.startswith("images/") and records[0].path.is_file()
    assert set(records[0].extra) == {"flickr_photo_id"}
    assert all(45.3 < r.lat < 45.5 and 12.2 < r.lon < 12.45 for r in records)
    auto, _ = read_metadata(venice, metadata=venice / "reference.csv")
    assert len(auto) == 1898

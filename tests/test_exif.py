"""EXIF GPS parsing on real camera files and on synthetic edge cases."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from delg_geo.core.errors import ImageLoadError
from delg_geo.features.exif import _text, read_exif_gps, read_exif_gps_reason

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXIF_DIR = DATA / "exif_gps"
SKIP_MSG = "../shared/data not found: real-data test needs the shared data folder"


def _write(path: Path, gps: dict | None, **kw) -> Path:
    img = Image.new("RGB", (16, 12), (200, 30, 30))
    if gps is None:
        img.save(path, **kw)
    else:
        exif = Image.Exif()
        exif[0x0110] = "test camera"
        exif[0x8825] = gps
        img.save(path, exif=exif, **kw)
    return path


SYDNEY = {1: "S", 2: (IFDRational(33), IFDRational(51), IFDRational(359, 10)), 3: "W",
          4: (151.0, 12.0, 40.0)}  # fmt: skip


@pytest.mark.shared
def test_real_exif_matches_metadata_csv():
    if not EXIF_DIR.is_dir():
        pytest.skip(SKIP_MSG)
    with open(EXIF_DIR / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9
    for row in rows:
        pos = read_exif_gps(EXIF_DIR / row["image"])
        assert pos is not None, row["image"]
        assert pos[0] == pytest.approx(float(row["lat"]), abs=1e-5), row["image"]
        assert pos[1] == pytest.approx(float(row["lon"]), abs=1e-5), row["image"]


def test_jpeg_without_exif_returns_none(tmp_path):
    p = _write(tmp_path / "plain.jpg", None, quality=90)
    assert read_exif_gps(p) is None
    assert read_exif_gps_reason(p) == (None, "no EXIF GPS data (JPEG image)")


def test_exif_without_gps_returns_none(tmp_path):
    img = Image.new("RGB", (8, 8))
    exif = Image.Exif()
    exif[0x0110] = "camera without GPS"
    img.save(tmp_path / "nogps.jpg", exif=exif)
    assert read_exif_gps(tmp_path / "nogps.jpg") is None


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_south_west_rationals(tmp_path, ext):
    pos = read_exif_gps(_write(tmp_path / f"syd.{ext}", SYDNEY))
    assert pos == pytest.approx((-(33 + 51 / 60 + 35.9 / 3600), -(151 + 12 / 60 + 40 / 3600)))


@pytest.mark.parametrize(
    "gps, reason",
    [
        ({1: "N", 2: (10.0, 30.0, 0.0), 3: "E"}, "no latitude/longitude"),
        ({1: "N", 2: (10.0, 30.0, 0.0), 4: (1.0, 2.0, 3.0)}, "reference"),
        ({1: "X", 2: (10.0, 30.0, 0.0), 3: "E", 4: (1.0, 2.0, 3.0)}, "reference"),
        ({1: "N", 2: (IFDRational(0, 0),) * 3, 3: "E", 4: (1.0, 2.0, 3.0)}, "not valid numbers"),
        ({1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (1.0, 2.0, 3.0)}, "out of range"),
        ({1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}, "0, 0"),
        ({1: "N", 2: (10.0, 30.0, 0.0), 3: "E", 4: (1.0, 2.0, 3.0), 9: "V"}, "void"),
    ],
)
def test_unusable_gps_returns_none_with_reason(tmp_path, gps, reason):
    p = _write(tmp_path / "bad.jpg", gps)
    pos, why = read_exif_gps_reason(p)
    assert pos is None and reason in why
    assert read_exif_gps(p) is None


def test_single_value_coordinates(tmp_path):
    p = _write(tmp_path / "dec.jpg", {1: "N", 2: 10.5, 3: "W", 4: 20.25})
    assert read_exif_gps(p) == pytest.approx((10.5, -20.25))


def test_reference_text_forms():
    assert _text(b"S\x00") == "S" and _text("w ") == "W" and _text(None) == ""


def test_corrupt_files_return_none(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    assert read_exif_gps(junk) is None
    assert read_exif_gps_reason(junk)[1] == "not an image (no image format recognised)"
    bad_app1 = tmp_path / "bad_app1.jpg"
    bad_app1.write_bytes(
        b"\xff\xd8\xff\xe1\x00\x20Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff" + b"\x00" * 40
    )
    assert read_exif_gps(bad_app1) is None
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert read_exif_gps(empty) is None
    assert read_exif_gps_reason(empty)[1] == "empty file (0 bytes)"


def test_truncated_jpeg_keeps_header_gps(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x8825] = SYDNEY
    Image.fromarray(noise).save(tmp_path / "full.jpg", exif=exif, quality=95)
    full = (tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full[: len(full) // 2])
    assert read_exif_gps(cut) == pytest.approx(read_exif_gps(tmp_path / "full.jpg"))


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        read_exif_gps(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        read_exif_gps(tmp_path)

import io

import numpy as np
import pytest
from PIL import Image

from delg_geo.core.errors import ImageLoadError
from delg_geo.features.images import load_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_exif_orientation_applied(tmp_path):
    # a 40x20 landscape image, red on its left half, stored with orientation 6 (rotate 90 CW)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(img, tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    im = load_image(p)
    assert im.array.shape[:2] == (40, 20)  # now portrait
    assert im.original_size == (20, 40)
    # rotated 90 degrees clockwise: the red (left) half ends up on top
    assert im.array[5, 10, 0] > 200 and im.array[35, 10, 0] < 60


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "WEBP"), ("I;16", "PNG"), ("LA", "PNG")],
)
def test_colour_modes_and_formats(tmp_path, mode, fmt):
    rgb = Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(16 * 24).reshape(16, 24) * 100).astype(np.uint16))
    p = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    im = load_image(p)
    assert im.array.dtype == np.uint8 and im.array.shape == (16, 24, 3)
    assert im.original_size == (24, 16)


def test_rgba_transparent_becomes_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    p = _save(Image.fromarray(a, "RGBA"), tmp_path / "t.png")
    assert load_image(p).array.min() == 255


def test_max_side_downscales_and_keeps_original_size(tmp_path):
    p = _save(Image.new("RGB", (2000, 1000), (10, 20, 30)), tmp_path / "big.jpg")
    im = load_image(p, max_side=500)
    assert max(im.array.shape[:2]) == 500
    assert im.original_size == (2000, 1000)
    assert im.scale == pytest.approx(0.25)


def test_truncated_image_names_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((200, 200, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert "cut.jpg" in str(e.value) and "\n" not in str(e.value)


def test_non_image_and_missing(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_image(p)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_pixel_cap(tmp_path):
    p = _save(Image.new("L", (3000, 3000)), tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(p, max_pixels=1_000_000)
    assert load_image(p, max_pixels=10_000_000).array.shape == (3000, 3000, 3)


def test_bytes_input():
    buf = io.BytesIO()
    Image.new("RGB", (10, 7), (1, 2, 3)).save(buf, "PNG")
    im = load_image(buf.getvalue())
    assert im.array.shape == (7, 10, 3) and tuple(im.array[0, 0]) == (1, 2, 3)

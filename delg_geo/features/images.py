"""Loading images safely: EXIF orientation, any colour mode, a pixel cap, one-line errors."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delg_geo.core.errors import ImageLoadError

#: Refuse to decode images with more pixels than this (decompression-bomb guard). Pillow's own
#: guard is set to the same number, so there is one cap and one message.
DEFAULT_MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

#: Images whose shorter side is below this many pixels are too small to describe: the network
#: would give no local features and an empty global descriptor.
MIN_IMAGE_SIDE = 32

try:  # HEIC/HEIF (iPhone photos), with their EXIF, through the pillow-heif plugin
    import pillow_heif as _pillow_heif

    _pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency
    HEIF_SUPPORTED = False

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"avc1", b"dash"}


def sniff_format(head: bytes) -> str | None:
    """A name for the file format of ``head`` (the first bytes of a file) when it is one that
    is often mistaken for a photo, else None."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF"
        if brand in _VIDEO_BRANDS:
            return "a video (MP4/MOV)"
        return f"an ISO media file (brand {brand.decode('latin-1').strip()!r})"
    table = (
        (b"%PDF", "a PDF document"),
        (b"\xff\x0a", "JPEG XL"),
        (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
        (b"8BPS", "a Photoshop document (PSD)"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"<svg", "an SVG drawing"),
        (b"<?xml", "an XML/SVG document"),
        (b"\x00\x00\x00\x18ftyp", "a video (MP4/MOV)"),
        (b"RIFF", "a RIFF file (AVI/WAV, not WebP)"),
    )
    for magic, name in table:
        if head.startswith(magic):
            return name
    return None


def _unidentified_reason(head: bytes) -> str:
    fmt = sniff_format(head)
    if fmt == "HEIC/HEIF" and not HEIF_SUPPORTED:
        return "unsupported image format: HEIC/HEIF (pip install pillow-heif to read it)"
    if fmt is not None:
        return f"unsupported format: {fmt}, not a photo delg-geo can read"
    return "not an image (no image format recognised)"


def too_large_message(pixels: int | None, limit: int) -> str:
    """The one message for the pixel cap, whether Pillow's guard or this module's catches it."""
    n = f"{pixels:,} pixels" if pixels else "too many pixels"
    return f"image too large ({n}; the limit is {limit:,} pixels)"


def too_small_message(size: tuple[int, int], min_side: int) -> str:
    return (f"image too small to describe ({size[0]}x{size[1]} pixels; at least {min_side} "
            "pixels are needed on the shorter side)")


def too_elongated_message(size: tuple[int, int], max_side: int, min_side: int) -> str:
    short = min(size) * max_side / float(max(size))
    return (f"image too elongated to describe ({size[0]}x{size[1]} pixels: downsized to {max_side} pixels on "
            f"the longer side, the shorter side would be {short:.0f} pixels; at least {min_side} are needed)")


@dataclass
class LoadedImage:
    """An RGB uint8 array, possibly downscaled, and the size of the original image.

    ``scale`` is array size / original size, so original = array coordinate / scale.
    """

    array: np.ndarray  # (H, W, 3) uint8
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    path: str = ""

    @property
    def scale(self) -> float:
        return self.array.shape[1] / float(self.original_size[0])


#: What :func:`load_image` (and ``Geolocator.locate``) accepts, for the message that refuses the rest.
ACCEPTED_SOURCES = ("a file path (str or pathlib.Path), bytes, bytearray or memoryview of an encoded image, "
                    "a binary file object, a PIL image, or a numpy uint8/uint16 array (H x W, H x W x 3 or H x W x 4)")


def source_name(source) -> str:
    """A short label for an image source: the path for a path, the file object's name, or
    ``<bytes>``, ``<array>``, ``<PIL image>`` (never the data itself)."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    name = getattr(source, "name", None) if hasattr(source, "read") else None
    if isinstance(name, str) and name:
        return name
    return "<file object>" if hasattr(source, "read") else "<None>" if source is None else f"<{type(source).__name__}>"


def _open_source(source, name: str):
    """A binary file handle for ``source`` (a path, bytes-like data or a file object), or a PIL
    image for an in-memory image (a PIL image or an array). Raises ImageLoadError."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_image(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return io.BytesIO(data)
    if hasattr(source, "read") and not isinstance(source, (str, Path)):
        try:
            data = source.read()
        except (OSError, ValueError) as e:
            raise ImageLoadError(name, f"cannot read the file object ({_short(e)})") from None
        if isinstance(data, str):
            raise ImageLoadError(name, "the file object is open in text mode; open it with 'rb'")
        if not data:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return io.BytesIO(bytes(data))
    if not isinstance(source, (str, Path)):
        what = "None" if source is None else f"an object of type {type(source).__name__}"
        raise ImageLoadError(name, f"cannot read an image from {what}; give {ACCEPTED_SOURCES}")
    if not str(source).strip():
        raise ImageLoadError("''", "empty path; give the path of an image file")
    p = Path(source)
    if not p.exists():
        raise ImageLoadError(name, "file not found")
    if p.is_dir():
        raise ImageLoadError(name, "is a directory, not an image")
    if p.stat().st_size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return open(p, "rb")


def _array_image(a: np.ndarray, name: str) -> Image.Image:
    """A PIL image of a uint8/uint16 array (H x W, H x W x 1, 3 or 4 channels)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageLoadError(name, f"an array of shape {a.shape} is not an image; expected H x W, H x W x 3 (RGB) "
                                   "or H x W x 4 (RGBA)")
    if a.dtype == np.uint16 and a.ndim == 2:  # 16-bit grey (mode I;16): scaled to 0-255 by _to_rgb
        return Image.fromarray(np.ascontiguousarray(a))
    if a.dtype != np.uint8:
        raise ImageLoadError(name, f"an array of dtype {a.dtype} is not an image; expected uint8 values 0-255 "
                                   "(for floats in 0-1: (a * 255).astype('uint8'))")
    return Image.fromarray(np.ascontiguousarray(a))


def load_image(
    source,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> LoadedImage:
    """Decode ``source`` to RGB: a path, the bytes of an encoded image (bytes, bytearray,
    memoryview), a binary file object, a PIL image or a numpy uint8/uint16 array
    (:data:`ACCEPTED_SOURCES`; anything else is refused with that list).

    The EXIF orientation is applied; grayscale, 16-bit, CMYK, palette, RGBA, PNG, WebP and HEIC are
    accepted. ``max_side`` downsizes so the longest side is at most that many pixels (aspect
    kept), so memory stays bounded whatever the upload. ``min_side`` refuses images whose
    shorter side is smaller (too small to describe), before and after that downsizing (a
    20000 x 40 strip would be 1024 x 2). Raises :class:`ImageLoadError` naming the source for
    anything that is not a readable image: an empty file, a named unsupported format (HEIC
    without pillow-heif, PDF, video, ...), over the pixel cap, truncated.
    """
    name = source_name(source)
    try:
        fh = _open_source(source, name)
        if isinstance(fh, Image.Image):
            arr, orig = _decode(fh, name, max_side, max_pixels, min_side, from_file=False)
        else:
            with fh:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", Image.DecompressionBombWarning)
                        img = Image.open(fh)
                except UnidentifiedImageError:
                    fh.seek(0)
                    raise ImageLoadError(name, _unidentified_reason(fh.read(32))) from None
                arr, orig = _decode(img, name, max_side, max_pixels, min_side, from_file=True)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageLoadError(name, too_large_message(int(m.group(1)) if m else None, max_pixels)) from None
    except UnidentifiedImageError as e:
        raise ImageLoadError(name, _short(e) or "not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(name, f"unreadable or truncated image ({_short(e)})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageLoadError(name, f"unexpected decoded shape {arr.shape}")
    return LoadedImage(np.ascontiguousarray(arr), orig, name)


def _decode(img: Image.Image, name: str, max_side, max_pixels, min_side, from_file: bool):
    """(RGB uint8 array, original (width, height)) of an opened image: size checks, EXIF
    orientation, RGB, downsizing to ``max_side``."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(name, "image has no pixels")
    if w * h > max_pixels:
        raise ImageLoadError(name, too_large_message(w * h, max_pixels))
    if min_side and min(w, h) < min_side:
        raise ImageLoadError(name, too_small_message((w, h), min_side))
    if max_side and min_side and min(w, h) * max_side / float(max(w, h)) < min_side and max(w, h) > max_side:
        raise ImageLoadError(name, too_elongated_message((w, h), max_side, min_side))
    if from_file and max_side and img.format == "JPEG":
        # Let libjpeg decode at a reduced size when far larger than needed (fast, exact-enough).
        img.draft("RGB", (max_side, max_side))
    img.load()
    img = ImageOps.exif_transpose(img)
    # Original size after orientation; draft() may have shrunk the decode by 2^k.
    ow, oh = (h, w) if _swaps_axes(img, w, h) else (w, h)
    img = _to_rgb(img)
    if max_side and max(img.size) > max_side:
        f = max_side / float(max(img.size))
        img = img.resize(
            (max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))),
            Image.BILINEAR,
        )
    return np.asarray(img, dtype=np.uint8), (int(ow), int(oh))


def _swaps_axes(img: Image.Image, w: int, h: int) -> bool:
    """True when EXIF orientation turned the image by 90 degrees."""
    iw, ih = img.size
    if w == h:
        return False
    # Compare aspect ratios rather than sizes because draft() can shrink the decode.
    return (iw >= ih) != (w >= h)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        return Image.fromarray((a / hi * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _short(e: BaseException) -> str:
    s = re.sub(r"\s*<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", str(e)).strip().splitlines()
    return s[0][:200] if s else type(e).__name__

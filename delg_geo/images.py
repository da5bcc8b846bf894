"""Loading images safely: EXIF orientation, any colour mode, a pixel cap, one-line errors."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

#: Refuse to decode images with more pixels than this (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 100_000_000


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


def load_image(
    source: str | Path | bytes,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode ``source`` (a path or raw bytes) to RGB.

    The EXIF orientation is applied; grayscale, CMYK, palette, RGBA, PNG and WebP are accepted.
    ``max_side`` downsizes so the longest side is at most that many pixels (aspect kept).
    Raises :class:`ImageLoadError` naming the file for anything that is not a readable image.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            fh = io.BytesIO(source)
        else:
            p = Path(source)
            if not p.exists():
                raise ImageLoadError(name, "file not found")
            if p.is_dir():
                raise ImageLoadError(name, "is a directory, not an image")
            fh = open(p, "rb")
        with fh:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fh)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(name, "image has no pixels")
            if w * h > max_pixels:
                raise ImageLoadError(
                    name, f"image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})"
                )
            if max_side and img.format == "JPEG":
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
            arr = np.asarray(img, dtype=np.uint8)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, _short(e) or "not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(name, f"unreadable or truncated image ({_short(e)})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageLoadError(name, f"unexpected decoded shape {arr.shape}")
    return LoadedImage(np.ascontiguousarray(arr), (int(ow), int(oh)), name)


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
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__

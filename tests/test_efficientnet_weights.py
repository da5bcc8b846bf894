"""The converted EfficientNet-Lite0 weights are right: ImageNet classes on real Venice photos."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import shared_path
from delg_geo.features.images import load_image
from delg_geo.features.models.efficientnet_lite import build_backbone, convert_state_dict, weights_source_path
from delg_geo.features.models.torch_legacy import load_legacy_state_dict

# Standard ILSVRC-2012 class indices of classes a Venice building photo should trigger.
ARCHITECTURE = {
    576: "gondola", 698: "palace", 497: "church", 442: "bell cote", 538: "dome", 663: "monastery",
    449: "boathouse", 873: "triumphal arch", 483: "castle", 668: "mosque", 682: "obelisk",
    718: "pier", 839: "suspension bridge", 821: "steel arch bridge", 888: "viaduct", 562: "fountain",
    858: "tile roof", 884: "vault", 406: "altar", 536: "dock", 832: "stupa", 727: "planetarium",
}
N_PHOTOS = 24


def _venice_batch():
    d = shared_path("venice")
    q = pd.read_csv(d / "queries.csv")
    paths = q.image.iloc[:: max(1, len(q) // N_PHOTOS)][:N_PHOTOS]
    arrs = []
    for p in paths:
        im = load_image(d / p).array
        arrs.append(np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC), np.float32))
    return np.stack(arrs)


def _top5(weights, batch):
    bb = build_backbone(taps=("head",), with_logits=True, weights=weights)
    _, logits = bb.model(batch)
    return np.argsort(-np.asarray(logits), axis=1)[:, :5]


def _passes(top5) -> tuple[float, int, bool]:
    hit_rate = float(np.mean([any(int(c) in ARCHITECTURE for c in row) for row in top5]))
    distinct = len({int(r[0]) for r in top5})
    return hit_rate, distinct, hit_rate >= 0.7 and distinct >= 4


@pytest.fixture(scope="module")
def batch():
    return _venice_batch()


def test_legacy_reader_shapes():
    sd = load_legacy_state_dict(weights_source_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_bn0.running_var"].dtype == np.float32 and np.all(sd["_bn0.running_var"] >= 0) and sd["_bn0.running_var"].max() > 1


def test_real_weights_classify_venice(batch):
    top5 = _top5("imagenet", batch)
    hit_rate, distinct, ok = _passes(top5)
    assert ok, f"architecture in top-5 for {hit_rate:.0%} of photos, {distinct} distinct top-1 classes"
    assert hit_rate >= 0.8


def test_random_weights_fail_the_check(batch):
    _, _, ok = _passes(_top5(None, batch))
    assert not ok


def test_mismapped_weights_fail_the_check(batch):
    """Weights of the right shapes put in the wrong places (kernels flipped) must not pass."""
    w = convert_state_dict(load_legacy_state_dict(weights_source_path()))
    bad = {k: (v[::-1, ::-1] if k.endswith("kernel") and v.ndim == 4 and v.shape[0] > 1 else v) for k, v in w.items()}
    bad["fc/bias"] = np.roll(w["fc/bias"], 7)
    bad["fc/kernel"] = np.roll(w["fc/kernel"], 7, axis=1)
    _, _, ok = _passes(_top5(bad, batch))
    assert not ok


def test_refuses_pickled_code(tmp_path):
    import pickle
    import struct

    from delg_geo.features.models.torch_legacy import LEGACY_MAGIC

    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        for obj in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")  # os.system('echo pwned')
        f.write(struct.pack("<q", 0))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_legacy_state_dict(p)

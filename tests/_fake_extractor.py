"""A deterministic extractor without TensorFlow, for tests of the build machinery (kill and
recover) that must start many processes quickly. Its features are a function of the pixels."""

from __future__ import annotations

import numpy as np

from delg_geo.features.base import Features, l2_normalize


class FakeExtractor:
    model_id = "fake-test"
    fingerprint = "f" * 64
    global_dim = 16
    local_dim = 8
    max_side = 256
    min_image_side = 8
    needs_whitening = False
    config = None

    def extract(self, image) -> Features:
        a = np.asarray(image.array, np.float32)
        h, w = a.shape[:2]
        cells = a[: h - h % 4, : w - w % 4].reshape(4, (h - h % 4) // 4, 4, (w - w % 4) // 4, 3).mean((1, 3, 4))
        g = l2_normalize(cells.reshape(-1) - cells.mean() + 1e-3)
        rng = np.random.default_rng(int(a.sum()) % (2**32))
        kp = (rng.uniform(0, 1, (20, 2)) * [w, h] / image.scale).astype(np.float32)
        desc = l2_normalize(rng.standard_normal((20, 8)).astype(np.float32), axis=1)
        return Features(g, kp, desc, np.linspace(1, 0, 20, dtype=np.float32), image.original_size, self.model_id)

    def extract_batch(self, images):
        return [self.extract(im) for im in images]


def fake_collection(root, names: list[str], broken: str | None = None):
    """``root/images`` with a random 128x96 picture per name (seeded by the name, the same in every
    run) and ``root/ref-N.csv`` listing them with positions; ``broken``: also a truncated JPEG.
    Returns ``(images_dir, csv_path)``."""
    import zlib
    from pathlib import Path

    import pandas as pd
    from PIL import Image

    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, name in enumerate(names):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / name)
        rows.append(dict(image=name, lat=55.70 + 0.001 * k, lon=13.19 + 0.001 * k))
    if broken:
        (images / broken).write_bytes(b"\xff\xd8\xff\xe0 this JPEG ends here")
        rows.append(dict(image=broken, lat=55.7, lon=13.19))
    csv = Path(root) / f"ref-{len(rows)}.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return images, csv

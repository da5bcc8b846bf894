"""Build checkpoints keep only the local features the index will keep (issue 9: a 5 M build's
temporary disk), and a checkpoint that kept fewer than a build asks for is extracted again."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _fake_extractor import FakeExtractor, fake_collection  # noqa: E402

from delg_geo.features.base import Features  # noqa: E402


class ShuffledScores(FakeExtractor):
    """The fake features with attention scores in no particular order (so 'the best' is not 'the first')."""

    def extract(self, image) -> Features:
        f = super().extract(image)
        rng = np.random.default_rng(int(f.keypoints[0, 0] * 1000) % 2**32)
        return Features(f.global_descriptor, f.keypoints, f.local_descriptors, rng.permutation(f.scores),
                        f.image_size, f.model_id)


def test_checkpoint_keeps_the_best_features_and_is_redone_when_it_kept_too_few(tmp_path):
    from delg_geo.features.images import load_image
    from index_builder.build import _load_parts, _write_part

    images, _ = fake_collection(tmp_path, [f"{k}.png" for k in range(6)])
    ex = ShuffledScores()
    rows = [dict(key=f"{k}.png", features=ex.extract(load_image(images / f"{k}.png", max_side=256))) for k in range(6)]
    full, small = tmp_path / "full", tmp_path / "small"
    _write_part(full, 0, rows, ex)
    _write_part(small, 0, rows, ex, max_local=8)
    with np.load(full / ".building" / "parts" / "part-00000.npz") as a, np.load(small / ".building" / "parts" / "part-00000.npz") as b:
        assert a["counts"].tolist() == [20] * 6 and b["counts"].tolist() == [8] * 6 and int(b["max_local"]) == 8
        f = rows[2]["features"]
        best = np.sort(np.argsort(-f.scores.astype(np.float16), kind="stable")[:8])
        assert not np.array_equal(best, np.arange(8))  # the test means something: best is not first
        np.testing.assert_array_equal(b["keypoints"][16:24], f.keypoints[best])
        np.testing.assert_array_equal(b["descriptors"][16:24], f.local_descriptors[best].astype(np.float16))
        np.testing.assert_array_equal(b["global_raw"], a["global_raw"])
        local = ("keypoints", "descriptors", "scores")
        assert sum(b[k].nbytes for k in local) / sum(a[k].nbytes for k in local) == 8 / 20
    logs: list[str] = []
    assert len(_load_parts(small, ex, logs.append, max_local=8)) == 1 and not logs
    assert _load_parts(small, ex, logs.append, max_local=12) == []  # kept too few: re-extracted
    assert "kept 8 local features per image, this build keeps 12" in logs[0]
    assert len(_load_parts(full, ex, logs.append, max_local=12)) == 1  # an old checkpoint kept them all


def test_index_from_trimmed_checkpoints_holds_the_best_features(tmp_path):
    from delg_geo.features.images import load_image
    from delg_geo.index.geo_index import GeoIndex
    from index_builder.assemble import CompactOptions
    from index_builder.build import BuildOptions, build_index

    images, csv = fake_collection(tmp_path, [f"{k}.png" for k in range(6)])
    ex = ShuffledScores()
    build_index(images, tmp_path / "index", csv, extractor=ex, log=lambda m: None,
                options=BuildOptions(progress=False, part_size=4, compact=CompactOptions(max_local=8)))
    idx = GeoIndex(tmp_path / "index", device="cpu")
    assert np.diff(idx.offsets).tolist() == [8] * 6
    for i in (0, 5):
        f = ex.extract(load_image(images / idx.image_name(i), max_side=256))
        best = np.sort(np.argsort(-f.scores.astype(np.float16), kind="stable")[:8])
        kp, _ = idx.local_features(i)
        np.testing.assert_allclose(kp, f.keypoints[best], atol=1.0)  # uint16 keypoints: within a unit

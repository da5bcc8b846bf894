"""PCA whitening fitted on the collection, and the identity used for small collections."""

from __future__ import annotations

import numpy as np

from delg_geo.features.base import l2_normalize
from delg_geo.index.whitening import Whitening, fit_pca_whitening


def _data(n=300, d=32, seed=0):
    rng = np.random.default_rng(seed)
    # anisotropic: a few strong directions, like real descriptors
    x = rng.normal(size=(n, d)) * np.linspace(5.0, 0.1, d)
    return l2_normalize(x.astype(np.float32), axis=1)


def test_pca_whitening_decorrelates_and_round_trips(tmp_path):
    x = _data()
    w = fit_pca_whitening(x, dim=8)
    y = (x - w.mean) @ w.projection
    cov = np.cov(y.T)
    # whitened: unit variance on every kept component, no correlation between them
    np.testing.assert_allclose(np.diag(cov), 1.0, rtol=0.05)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.05
    w.save(tmp_path / "w.npz")
    w2 = Whitening.load(tmp_path / "w.npz")
    assert (w2.in_dim, w2.out_dim) == (32, 8)
    np.testing.assert_allclose(w2.apply(x[:5]), w.apply(x[:5]), rtol=1e-6)


def test_identity_is_stored_without_a_matrix(tmp_path):
    x = _data(d=1280)
    w = Whitening.identity(1280)
    assert (w.in_dim, w.out_dim) == (1280, 1280)
    np.testing.assert_allclose(w.apply(x[:4] * 3.0), x[:4], rtol=1e-6)
    w.save(tmp_path / "id.npz")
    # a 1280 x 1280 float32 matrix would be 6.5 MB; only the mean is written
    assert (tmp_path / "id.npz").stat().st_size < 10_000
    w2 = Whitening.load(tmp_path / "id.npz")
    assert w2.projection is None
    np.testing.assert_allclose(w2.apply(x[:4]), x[:4], rtol=1e-6)


def test_too_few_images_give_the_identity():
    assert fit_pca_whitening(_data(n=1)).projection is None

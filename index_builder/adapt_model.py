"""The trainable part of an adapted global descriptor, and the photos it trains on (``index adapt``).

* :class:`FinetuneModel` (the embedded default model): the backbone's blocks from
  ``first_block`` to the head, GeM's ``p`` and a learned projection (initialised with the index's
  PCA whitening), run on activation maps of the frozen earlier blocks that
  :func:`cache_maps` computed once per photo, at one scale.
* :class:`ProjectionModel` (any model): a learned linear map of the index's stored whitened
  vectors, initialised with the identity.

Both embed a list of photo ids into L2-normalised rows under a ``tf.GradientTape`` and export
themselves as :class:`~delg_geo.features.models.adapted.AdaptedWeights`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from delg_geo.core.errors import DelgGeoError
from delg_geo.features.models.adapted import AdaptedWeights
from index_builder.work import _kill_point

#: The tap whose output feeds block ``first_block`` (the frozen part's last block).
TAP_BEFORE = {16: "stage7", 15: "stage6", 11: "stage5", 8: "stage4", 5: "stage3"}  # 16: the head only


def _tf():
    import tensorflow as tf

    return tf


class FinetuneModel:
    """Blocks ``first_block``.. to the head, GeM ``p`` and a projection, over cached maps."""

    kind = "finetune"

    def __init__(self, first_block: int, mean: np.ndarray, projection: np.ndarray | None, start: AdaptedWeights | None = None,
                 gem_p: float = 3.0, whitened: bool = False):
        """``whitened``: train through a projection (initialised with the index's whitening
        ``mean``, ``projection``; the centre is kept) and embed in its space; otherwise embed the
        raw L2-normalised GeM (Radenović's recipe: a PCA whitening is fitted afterwards)."""
        from delg_geo.features.models.efficientnet_lite import build_tail, converted_weights, tail_layer_names

        tf = _tf()
        if first_block not in TAP_BEFORE:
            raise DelgGeoError(f"adapting from block {first_block} is not supported; choose one of {sorted(TAP_BEFORE)}")
        self.first_block = first_block
        weights, _ = converted_weights()
        if start is not None and start.kind == "finetune":  # an adapted index adapted again: from its weights
            weights = {**weights, **start.layers}
            gem_p = start.gem_p
        self.names = tail_layer_names(first_block)
        self.tail = build_tail(first_block, weights)
        self.whitened = whitened
        self.p = tf.Variable(float(gem_p), dtype=tf.float32, name="gem_p")
        self.mean = tf.constant(np.asarray(mean, np.float32))
        self.base_proj = tf.constant(np.eye(len(mean), dtype=np.float32) if projection is None else projection)
        d = int(self.base_proj.shape[1])
        self.rot = tf.Variable(np.eye(d, dtype=np.float32), name="projection")  # learned, in the whitened space
        self.variables = list(self.tail.trainable_variables) + [self.p] + ([self.rot] if whitened else [])
        self.start = [v.numpy().copy() for v in self.variables]
        self._fn = tf.function(self._forward, input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])

    def _forward(self, maps):
        tf = _tf()
        h = self.tail(maps, training=False)
        p = tf.clip_by_value(self.p, 1.0, 20.0)
        gem = tf.pow(tf.reduce_mean(tf.pow(tf.maximum(h, 1e-6), p), axis=[1, 2]), 1.0 / p)
        raw = tf.math.l2_normalize(gem, axis=1)
        if not self.whitened:
            return raw
        return tf.math.l2_normalize(tf.matmul(tf.matmul(raw - self.mean, self.base_proj), self.rot), axis=1)

    def search_space(self, emb: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
        """Embeddings as the index would search them: raw ones whitened by a PCA fitted on
        ``fit_on`` rows (as the rebuild fits it), whitened ones as they are."""
        if self.whitened:
            return emb
        from delg_geo.index.whitening import fit_pca_whitening

        if len(fit_on) < 100:
            return emb
        return fit_pca_whitening(emb[fit_on], dim=int(self.base_proj.shape[1]), power=0.5, shrinkage=0.1).apply(emb)

    def embed(self, inputs: list[np.ndarray]):
        """(len(inputs), d) embeddings of same-shaped maps, as one batch."""
        return self._fn(np.stack(inputs).astype(np.float32))

    def export(self, base_fingerprint: str, recipe: dict) -> AdaptedWeights:
        layers = {}
        for name in self.names:
            k, b = self.tail.get_layer(name).get_weights()
            layers[f"{name}/kernel"], layers[f"{name}/bias"] = k, b
        proj = (self.base_proj.numpy() @ self.rot.numpy()) if self.whitened else None
        return AdaptedWeights("finetune", base_fingerprint, layers, self.first_block, float(np.clip(self.p.numpy(), 1, 20)),
                              self.mean.numpy() if self.whitened else None, proj, recipe)


class ProjectionModel:
    """A learned linear map of the index's whitened vectors (for every model)."""

    kind = "projection"

    def __init__(self, dim: int):
        tf = _tf()
        self.proj = tf.Variable(np.eye(dim, dtype=np.float32), name="projection")
        self.variables = [self.proj]
        self.start = [v.numpy().copy() for v in self.variables]
        self._fn = tf.function(lambda x: tf.math.l2_normalize(tf.matmul(x, self.proj), axis=1),
                               input_signature=[tf.TensorSpec([None, None], tf.float32)])

    def embed(self, inputs: list[np.ndarray]):
        return self._fn(np.stack(inputs).astype(np.float32))

    def search_space(self, emb: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
        return emb

    def export(self, base_fingerprint: str, recipe: dict) -> AdaptedWeights:
        return AdaptedWeights("projection", base_fingerprint, projection=self.proj.numpy(), recipe=recipe)


def model_state(model) -> dict[str, np.ndarray]:
    return {f"v{i:03d}": v.numpy() for i, v in enumerate(model.variables)}


def load_state(model, state: dict[str, np.ndarray]) -> None:
    for i, v in enumerate(model.variables):
        v.assign(state[f"v{i:03d}"])


def embed_ids(model, ids, inputs: dict[int, np.ndarray], batch: int = 32):
    """Embeddings of photos ``ids`` (rows in that order): same-shaped inputs share a batch."""
    tf = _tf()
    groups: dict[tuple, list[int]] = {}
    for r, i in enumerate(ids):
        groups.setdefault(inputs[int(i)].shape, []).append(r)
    rows, outs = [], []
    for members in groups.values():
        for a in range(0, len(members), batch):
            part = members[a : a + batch]
            outs.append(model.embed([inputs[int(ids[r])] for r in part]))
            rows += part
    order = np.argsort(np.asarray(rows))
    return tf.gather(tf.concat(outs, axis=0), order)


# -- the frozen part's activations ---------------------------------------------------------------

def cache_maps(paths: dict[int, str], first_block: int, config, train_side: int, work: Path, part_size: int = 64,
               progress=False, log=print) -> dict[int, np.ndarray]:
    """The frozen blocks' output (float16) for each photo ``id -> path``, the photo at most
    ``train_side`` pixels on its longest side, at scale 1; kept in ``work`` part by part, so a
    killed run keeps what it finished. A photo that cannot be read is left out (with a note)."""
    from delg_geo.core.progress import progress_bar
    from delg_geo.features.images import load_image
    from delg_geo.features.models.efficientnet_lite import build_backbone

    work.mkdir(parents=True, exist_ok=True)
    out: dict[int, np.ndarray] = {}
    for f in sorted(work.glob("part-*.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                ids, shapes, flat = z["ids"], z["shapes"], z["flat"]
            cuts = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))])
            for j, i in enumerate(ids):
                out[int(i)] = flat[cuts[j] : cuts[j + 1]].reshape(shapes[j])
        except Exception:  # noqa: BLE001 - a damaged part is computed again
            f.unlink(missing_ok=True)
    todo = [i for i in sorted(paths) if i not in out]
    if not todo:
        return {i: out[i] for i in paths if i in out}
    trunk = build_backbone(taps=(TAP_BEFORE[first_block],)).model
    bar = progress_bar(len(todo), "adapt: cache", bool(progress), unit="img")
    number = len(list(work.glob("part-*.npz")))
    missing = []
    for a in range(0, len(todo), part_size):
        ids, maps = [], []
        for i in todo[a : a + part_size]:
            try:
                im = load_image(paths[i], max_side=train_side)
            except Exception as e:  # noqa: BLE001
                missing.append(f"{paths[i]}: {e}")
                bar.update(1)
                continue
            m = trunk(im.array[None].astype(np.float32), training=False)
            ids.append(i)
            maps.append(np.asarray(m[0], np.float16))
            bar.update(1)
        if ids:
            tmp = work / f".part-{number:05d}.tmp.npz"
            np.savez(tmp, ids=np.asarray(ids, np.int64), shapes=np.array([m.shape for m in maps], np.int64),
                     flat=np.concatenate([m.reshape(-1) for m in maps]))
            os.replace(tmp, work / f"part-{number:05d}.npz")
            number += 1
            out.update(zip(ids, maps))
            _kill_point("adapt-cache")
    bar.close()
    if missing:
        log(f"{len(missing)} photo(s) could not be read for training and are left out of it (first: {missing[0]})")
    return {i: out[i] for i in paths if i in out}

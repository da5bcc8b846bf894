"""PlaNet-style cell classifier on global descriptors.

A small softmax head (optionally with one hidden layer) trained in Keras to map a global descriptor
to the S2 cell of a :class:`~delg_geo.evaluation.cells.Partition` that holds the photo. The predicted location
is the centre of mass of the most probable cell.

Training targets are either one-hot cell labels (PlaNet) or haversine-smoothed distributions over
cells (PIGEON, Haas et al. 2024): for a training photo at ``x`` the target of cell ``n`` is
proportional to ``exp(-(d(x, c_n) - d(x, c_min)) / tau)``, where ``c_n`` is the cell's centre of
mass, ``d`` the great-circle distance and ``c_min`` the centre nearest to ``x`` (the offset does not
change the normalised distribution; it keeps the exponentials in range). Neighbouring cells thus
share the mass and a prediction one cell off is penalised less than one across the city.

The saved form is plain files: ``partition.csv``, ``weights.npz`` (arrays only, read with
``allow_pickle=False``) and ``classifier.json``. Inference runs in NumPy, so loading a classifier
does not import TensorFlow and gives exactly the predictions of the saved one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.jsonio import dumps as json_dumps
from delg_geo.evaluation.cells import Partition
from delg_geo.core.geo import haversine_km

__all__ = ["CellClassifier", "train_classifier", "smoothed_targets", "default_smoothing_km"]

FORMAT_VERSION = 1
_FILES = ("partition.csv", "weights.npz", "classifier.json")


def default_smoothing_km(partition: Partition) -> float:
    """Default haversine smoothing ``tau``: a quarter of the median cell size of the partition.

    ``tau`` must scale with the cells: PIGEON uses 75 km for geocells hundreds of km across, which
    would flatten a city partition completely. A quarter of the median cell size (the square root
    of the S2 cell's area) leaves about half of the target mass on a photo's own cell and spreads
    the rest over the adjacent cells.
    """
    if not len(partition):
        raise ValueError("empty partition")
    return float(0.25 * np.median(partition.cell_size_km()))


def smoothed_targets(lats, lons, partition: Partition, tau_km: float) -> np.ndarray:
    """Haversine label smoothing: (N, K) rows ``softmax(-(d(x, c_n) - min_n d(x, c_n)) / tau)``."""
    if not tau_km > 0:
        raise ValueError(f"tau_km must be > 0, got {tau_km}")
    lats = np.asarray(lats, dtype=np.float64).reshape(-1, 1)
    lons = np.asarray(lons, dtype=np.float64).reshape(-1, 1)
    d = haversine_km(lats, lons, partition.lats[None, :], partition.lons[None, :])
    z = np.exp(-(d - d.min(axis=1, keepdims=True)) / float(tau_km))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def _as_descriptors(x, dims: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"descriptors must be an (N, D) array, got shape {x.shape}")
    if dims is not None and x.shape[1] != dims:
        raise ValueError(f"descriptors have {x.shape[1]} dimensions, the classifier expects {dims}")
    if not np.all(np.isfinite(x)):
        raise ValueError("descriptors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class CellClassifier:
    """A trained cell classifier: its partition, its weights and what it was trained with.

    ``weights`` holds ``input/mean`` and ``input/scale`` (standardisation of the L2-normalised
    descriptor), optionally ``hidden/kernel`` and ``hidden/bias`` (ReLU layer), and
    ``logits/kernel`` and ``logits/bias``.
    """

    partition: Partition
    weights: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.weights["input/mean"].shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weights["logits/bias"].shape[0])

    def predict_proba(self, descriptors) -> np.ndarray:
        """(N, K) cell probabilities."""
        x = _as_descriptors(descriptors, self.dims)
        w = self.weights
        h = (x - w["input/mean"]) / w["input/scale"]
        if "hidden/kernel" in w:
            h = np.maximum(h @ w["hidden/kernel"] + w["hidden/bias"], 0.0)
        return _softmax((h @ w["logits/kernel"] + w["logits/bias"]).astype(np.float64))

    def predict(self, descriptors, top_k: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each descriptor, the ``top_k`` cell indices and their probabilities, best first."""
        p = self.predict_proba(descriptors)
        k = max(1, min(int(top_k), p.shape[1]))
        idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
        return [(row, p[i, row]) for i, row in enumerate(idx)]

    def predict_latlon(self, descriptors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre of mass of the most probable cell, and that cell's probability as confidence."""
        p = self.predict_proba(descriptors)
        best = np.argmax(p, axis=1)
        return self.partition.lats[best], self.partition.lons[best], p[np.arange(len(best)), best]

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.partition.to_csv(directory / "partition.csv")
        np.savez(directory / "weights.npz", **{k: np.asarray(v) for k, v in self.weights.items()})
        meta = dict(self.info)
        meta.update(
            format_version=FORMAT_VERSION,
            dims=self.dims,
            num_classes=self.num_classes,
            t1=self.partition.t1,
            t2=self.partition.t2,
            weights=sorted(self.weights),
        )
        (directory / "classifier.json").write_text(json_dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory) -> "CellClassifier":
        directory = Path(directory)
        missing = [f for f in _FILES if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
        info = json.loads((directory / "classifier.json").read_text(encoding="utf-8"))
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported classifier format {info.get('format_version')!r}")
        partition = Partition.from_csv(directory / "partition.csv")
        with np.load(directory / "weights.npz", allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
        for key in ("input/mean", "input/scale", "logits/kernel", "logits/bias"):
            if key not in weights:
                raise ValueError(f"{directory}/weights.npz: missing {key}")
        clf = cls(partition=partition, weights=weights, info=info)
        if clf.num_classes != len(partition) or weights["logits/kernel"].shape != (clf._width(), len(partition)):
            raise ValueError(f"{directory}: weights do not match the partition ({len(partition)} cells)")
        if info.get("dims") not in (None, clf.dims):
            raise ValueError(f"{directory}: classifier.json says {info['dims']} dims, weights have {clf.dims}")
        return clf

    def _width(self) -> int:
        return int(self.weights["hidden/bias"].shape[0]) if "hidden/kernel" in self.weights else self.dims


def train_classifier(
    descriptors,
    lats,
    lons,
    partition: Partition,
    epochs: int = 30,
    label_smoothing_km: float | str | None = None,
    seed: int = 0,
    *,
    hidden: int = 0,
    dropout: float = 0.1,
    l2: float = 1e-4,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.1,
) -> CellClassifier:
    """Train a softmax cell classifier on reference descriptors.

    ``label_smoothing_km``: ``None`` trains on one-hot labels (photos outside every kept cell are
    left out); a positive number is the PIGEON haversine smoothing ``tau`` in km; ``"auto"`` uses
    :func:`default_smoothing_km`. With smoothing every photo is used, as its target needs no cell.

    ``val_fraction`` of the photos (at random, with ``seed``) is held out to report accuracy; the
    model is trained on the rest. ``hidden > 0`` adds a ReLU layer of that width. Training is
    deterministic for a given seed on a given machine.
    """
    x = _as_descriptors(descriptors)
    lats = np.asarray(lats, dtype=np.float64).ravel()
    lons = np.asarray(lons, dtype=np.float64).ravel()
    if not (len(x) == lats.size == lons.size):
        raise ValueError(f"{len(x)} descriptors but {lats.size} latitudes and {lons.size} longitudes")
    k = len(partition)
    if k < 1:
        raise ValueError("the partition has no cells")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")

    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a whole number of at least 1, got {epochs!r}")
    labels = partition.assign(lats, lons)
    tau, keep, y = _targets(lats, lons, labels, partition, label_smoothing_km, len(x))
    rng = np.random.default_rng(seed)
    keep = rng.permutation(keep)
    n_val = int(round(val_fraction * keep.size)) if keep.size > 1 else 0
    val_idx, train_idx = np.sort(keep[:n_val]), np.sort(keep[n_val:])

    xt = x[train_idx]
    mean = xt.mean(axis=0).astype(np.float32)
    scale = np.maximum(xt.std(axis=0), 1e-6).astype(np.float32)
    xs = (x - mean) / scale
    t0 = time.perf_counter()
    model, history = _fit(xs[train_idx], y[train_idx], k, hidden, dropout, l2, learning_rate, batch_size, epochs, seed)
    train_s = time.perf_counter() - t0

    weights = {"input/mean": mean, "input/scale": scale}
    for name in ("hidden", "logits") if hidden else ("logits",):
        kernel, bias = model.get_layer(name).get_weights()
        weights[f"{name}/kernel"] = np.asarray(kernel, dtype=np.float32)
        weights[f"{name}/bias"] = np.asarray(bias, dtype=np.float32)

    clf = CellClassifier(partition=partition, weights=weights)

    def accuracy(idx: np.ndarray) -> float | None:
        idx = idx[labels[idx] >= 0]
        if idx.size == 0:
            return None
        return float(np.mean(np.argmax(clf.predict_proba(x[idx]), axis=1) == labels[idx]))

    losses = history.history.get("loss", [])
    clf.info = {
        "training": {
            "epochs": int(epochs),
            "seed": int(seed),
            "label_smoothing_km": tau,
            "hidden": int(hidden),
            "dropout": float(dropout),
            "l2": float(l2),
            "learning_rate": float(learning_rate),
            "batch_size": int(batch_size),
            "val_fraction": float(val_fraction),
            "n_train": int(train_idx.size),
            "n_val": int(val_idx.size),
            "final_loss": float(losses[-1]) if losses else None,
            "seconds": round(train_s, 3),
        },
        "train_accuracy": accuracy(train_idx),
        "val_accuracy": accuracy(val_idx),
        "chance_accuracy": float(partition.counts.max() / partition.counts.sum()),
    }
    return clf


def _targets(lats, lons, labels, partition: Partition, label_smoothing_km, n: int):
    """(tau, the photos trained on, their target distributions): one-hot cells, or PIGEON's
    haversine smoothing with ``tau`` km."""
    k = len(partition)
    if label_smoothing_km is None:
        tau = None
        keep = np.flatnonzero(labels >= 0)
    else:
        tau = default_smoothing_km(partition) if label_smoothing_km == "auto" else float(label_smoothing_km)
        if not tau > 0:
            raise ValueError(f"label_smoothing_km must be > 0, None or 'auto', got {label_smoothing_km!r}")
        keep = np.arange(n)
    if keep.size == 0:
        raise ValueError("no training photo falls in a cell of the partition")
    if tau is None:
        y = np.zeros((n, k), dtype=np.float32)
        y[keep, labels[keep]] = 1.0
    else:
        y = smoothed_targets(lats, lons, partition, tau)
    return tau, keep, y


def _fit(x, y, k: int, hidden: int, dropout: float, l2: float, learning_rate: float, batch_size: int, epochs: int,
         seed: int):
    """A softmax layer (after an optional ReLU layer) fitted with Keras; returns (model, history)."""
    import keras  # deferred: importing TensorFlow is slow

    keras.utils.set_random_seed(int(seed))
    reg = keras.regularizers.L2(l2) if l2 else None
    inp = keras.Input(shape=(x.shape[1],), name="descriptor")
    h = keras.layers.Dropout(dropout, seed=seed)(inp) if dropout else inp
    if hidden:
        h = keras.layers.Dense(int(hidden), activation="relu", kernel_regularizer=reg, name="hidden")(h)
        if dropout:
            h = keras.layers.Dropout(dropout, seed=seed + 1)(h)
    out = keras.layers.Dense(k, kernel_regularizer=reg, name="logits")(h)
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, epochs=int(epochs), batch_size=int(batch_size), shuffle=True, verbose=0)
    return model, history

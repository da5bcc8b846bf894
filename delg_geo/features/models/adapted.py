"""Adapted global-branch weights: what ``delg-geo index adapt`` learns, stored as plain arrays.

Two kinds:

* ``finetune`` (the embedded default model): new weights for the backbone's blocks from
  ``first_block`` to the 1280-channel head, and GeM's exponent ``p``. An extractor built with
  them (:class:`~delg_geo.features.models.lite_delg.LiteDelgExtractor` ``adapted=``) computes
  the adapted global descriptor; its fingerprint covers the base model's and these weights'.
* ``projection`` (any model, an official DELG SavedModel included): the model is unchanged;
  only a learned linear projection of the global descriptor, which the index stores as its
  whitening.

Both carry the learned projection (``mean``, ``projection``: the index's whitening) and the
fingerprint of the model they adapt, so that weights meant for another model are refused. The
file is an ``.npz`` read with ``allow_pickle=False``; the recipe is a JSON string inside it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delg_geo.core.errors import ModelError

KINDS = ("finetune", "projection")


@dataclass
class AdaptedWeights:
    kind: str  # "finetune" or "projection"
    base_fingerprint: str  # the model these weights adapt
    layers: dict = field(default_factory=dict)  # "LAYER/kernel" | "LAYER/bias" -> array (finetune)
    first_block: int = -1  # finetune: blocks from this one to the head are replaced
    gem_p: float = 3.0
    mean: np.ndarray | None = None  # (D,) the learned projection's centre (the index's whitening)
    projection: np.ndarray | None = None  # (D, d)
    recipe: dict = field(default_factory=dict)  # how they were learned (epochs, loss, mined counts)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"layer:{k}": np.asarray(v, np.float32) for k, v in sorted(self.layers.items())}
        out.update(kind=np.array(self.kind), base_fingerprint=np.array(self.base_fingerprint),
                   first_block=np.array(int(self.first_block)), gem_p=np.array(float(self.gem_p), np.float32),
                   recipe=np.array(json.dumps(self.recipe, sort_keys=True)))
        if self.mean is not None:
            out["mean"] = np.asarray(self.mean, np.float32)
        if self.projection is not None:
            out["projection"] = np.asarray(self.projection, np.float32)
        return out

    def digest(self) -> str:
        """sha256 over every array but the recipe (two files with the same weights agree)."""
        h = hashlib.sha256()
        for k, v in sorted(self.arrays().items()):
            if k == "recipe":
                continue
            a = np.ascontiguousarray(v)
            h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **self.arrays())
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "AdaptedWeights":
        """Read an adapted-weights file; raise :class:`ModelError` naming it when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
            kind = str(d["kind"])
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            w = cls(kind=kind, base_fingerprint=str(d["base_fingerprint"]),
                    layers={k[6:]: d[k] for k in d if k.startswith("layer:")},
                    first_block=int(d["first_block"]), gem_p=float(d["gem_p"]),
                    mean=d.get("mean"), projection=d.get("projection"), recipe=json.loads(str(d["recipe"])))
        except Exception as e:  # noqa: BLE001 - any damage: one message naming the file
            raise ModelError(f"{path}: not readable adapted weights ({type(e).__name__}: {e})") from None
        for k, v in list(w.layers.items()) + [("gem_p", np.array(w.gem_p))] + \
                [(n, a) for n, a in (("mean", w.mean), ("projection", w.projection)) if a is not None]:
            if not np.isfinite(v).all():
                raise ModelError(f"{path}: adapted weights {k} hold non-finite values")
        if not 1.0 <= w.gem_p <= 20.0:
            raise ModelError(f"{path}: GeM exponent {w.gem_p} out of range [1, 20]")
        return w


def adapted_fingerprint(base_fingerprint: str, weights: AdaptedWeights) -> str:
    """The fingerprint of a model adapted by ``weights`` (what an adapted index records)."""
    desc = json.dumps({"base": base_fingerprint, "adapted": weights.digest()}, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()


def check_base(weights: AdaptedWeights, base_fingerprint: str, where: str = "adapted weights") -> None:
    if weights.base_fingerprint != base_fingerprint:
        raise ModelError(
            f"{where} adapt the model with fingerprint {weights.base_fingerprint[:12]}, not this one "
            f"({base_fingerprint[:12]}); they belong to another index or model")

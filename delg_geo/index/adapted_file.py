"""The adapted weights an index carries (``delg-geo index adapt``), read and checked.

An adapted index lists ``adapt.npz`` in its manifest (size and checksum, as every file) and
records in ``manifest.adapt`` the weights' kind, their digest, the model they adapt and how they
were learned. :func:`load_adapted` refuses weights that are damaged (size, checksum, contents) or
that are not the ones the index was adapted with (another index's file, however intact), with
a message naming the file.
"""

from __future__ import annotations

from pathlib import Path

from delg_geo.core.errors import IndexFormatError, ModelError
from delg_geo.index.integrity import damaged_message, file_problem

ADAPT_FILE = "adapt.npz"


def adapted_problem(index_dir: str | Path, manifest) -> str | None:
    """Why the index's adapted weights cannot be used, or None (also None for an unadapted index)."""
    try:
        load_adapted(index_dir, manifest)
    except IndexFormatError as e:
        return str(e)
    return None


def load_adapted(index_dir: str | Path, manifest):
    """The index's :class:`~delg_geo.features.models.adapted.AdaptedWeights`, or None when it is
    not adapted; raises :class:`IndexFormatError` naming the file when they cannot be trusted."""
    from delg_geo.features.models.adapted import AdaptedWeights, adapted_fingerprint

    info = manifest.adapt or {}
    if not info:
        return None
    index_dir = Path(index_dir)
    name = str(info.get("file", ADAPT_FILE))
    why = file_problem(index_dir, name, manifest.files.get(name), manifest.checksums.get(name), full=True)
    if why is None and name not in manifest.files:
        why = "is not listed in the manifest"
    if why:
        raise IndexFormatError(damaged_message(index_dir, name, why))
    try:
        w = AdaptedWeights.load(index_dir / name)
    except ModelError as e:
        raise IndexFormatError(damaged_message(index_dir, name, f"cannot be read ({str(e).split(': ', 1)[-1]})")) from None
    mismatch = None
    if w.digest() != info.get("digest"):
        mismatch = "holds other weights than the ones this index was adapted with (a file from another index?)"
    elif w.kind != info.get("kind") or w.base_fingerprint != info.get("base_fingerprint"):
        mismatch = f"holds {w.kind} weights of model {w.base_fingerprint[:12]}, the manifest expects " \
                   f"{info.get('kind')} of {str(info.get('base_fingerprint'))[:12]}"
    elif w.kind == "finetune" and adapted_fingerprint(w.base_fingerprint, w) != manifest.model_fingerprint:
        mismatch = "does not give the model fingerprint the manifest records"
    if mismatch:
        raise IndexFormatError(damaged_message(index_dir, name, mismatch))
    return w

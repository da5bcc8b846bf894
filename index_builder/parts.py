"""A build's checkpoints: the extracted features of a batch of images, written atomically to
``.building/parts/part-NNNNN.npz`` and read back when the index is assembled or a build resumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from index_builder.assemble import best_feature_rows
from index_builder.work import BUILDING, _kill_point


def _load_parts(index_dir: Path, extractor=None, log=None, max_local: int | None = None) -> list[dict]:
    """The checkpoints of an interrupted run, as ``{"path", "keys"}`` (their arrays are read again,
    one at a time, when the index is assembled). A damaged one, one written by another model
    (its fingerprint, or for old checkpoints its dimensions, differ), or one that kept fewer local
    features per image than ``max_local`` is removed: its images are extracted again."""
    parts_dir = index_dir / BUILDING / "parts"
    parts = []
    for p in sorted(parts_dir.glob("part-*.npz")):
        why = None
        try:
            with np.load(p, allow_pickle=False) as z:
                part = {k: z[k] for k in z.files}
            n = len(part["keys"])
            if not (len(part["global_raw"]) == n == len(part["counts"]) == len(part["sizes"])
                    and int(part["counts"].sum()) == len(part["keypoints"]) == len(part["descriptors"])):
                why = "inconsistent arrays"
            elif extractor is not None:
                fp = str(part["model_fingerprint"]) if "model_fingerprint" in part else ""
                if (fp and fp != extractor.fingerprint) or part["global_raw"].shape[1] != extractor.global_dim:
                    why = "written by another model"
            kept = int(part["max_local"]) if "max_local" in part else 0
            if why is None and max_local and 0 < kept < max_local:
                why = f"kept {kept} local features per image, this build keeps {max_local}"
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint is re-extracted
            why = f"unreadable ({type(e).__name__})"
        if why:
            if log is not None:
                log(f"checkpoint {p.name}: {why}; its images are extracted again")
            p.unlink(missing_ok=True)
            continue
        parts.append(dict(path=p, keys=part["keys"]))
    return parts


def _write_part(index_dir: Path, number: int, rows: list[dict], extractor=None, max_local: int | None = None) -> None:
    """Checkpoint ``rows`` as part ``number``, atomically. With ``max_local``, only the local
    features the index will keep (the best ``max_local`` of each image) are written: half the
    bytes of a checkpoint at the default 500 of 1000."""
    parts_dir = index_dir / BUILDING / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    feats = [r["features"] for r in rows]
    counts = np.array([f.num_local for f in feats], np.int64)
    scores = np.concatenate([f.scores for f in feats]).astype(np.float16)
    keep = best_feature_rows(counts, scores, max_local) if max_local else np.arange(len(scores))
    if max_local:
        counts = np.minimum(counts, max_local)
    arrays = dict(
        keys=np.array([r["key"] for r in rows]),
        global_raw=np.stack([f.global_descriptor for f in feats]).astype(np.float32),
        counts=counts,
        keypoints=np.concatenate([f.keypoints for f in feats]).astype(np.float32)[keep],
        descriptors=np.concatenate([f.local_descriptors for f in feats]).astype(np.float16)[keep],
        scores=scores[keep],
        sizes=np.array([f.image_size for f in feats], np.int64),
        model_fingerprint=np.array(getattr(extractor, "fingerprint", "")),
        max_local=np.array(int(max_local or 0)),  # 0: every feature kept
    )
    final = parts_dir / f"part-{number:05d}.npz"
    tmp = parts_dir / f".part-{number:05d}.tmp.npz"
    try:
        np.savez(tmp, **arrays)
    except BaseException:  # a full disk, an interrupt: no half-written checkpoint stays behind
        tmp.unlink(missing_ok=True)
        raise
    _kill_point("part-tmp")
    os.replace(tmp, final)
    _kill_point("part")


def _select(part: dict, keep: np.ndarray) -> dict:
    """The images of a checkpoint where ``keep`` is true (features follow their images)."""
    feat_keep = np.repeat(keep, part["counts"])
    out = dict(part)
    for k in ("keys", "global_raw", "counts", "sizes"):
        out[k] = part[k][keep]
    for k in ("keypoints", "descriptors", "scores"):
        out[k] = part[k][feat_keep]
    return out

"""The ASMK inverted file's codebook: its size for a collection, the sample it is fitted on, and
the base index's own codebook kept on ``index add``. ``opts`` is an
:class:`index_builder.assemble.CompactOptions`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: The inverted file's codebook: at least this many words, about one
#: word per ENTRIES_PER_WORD entries (a query reads ~450 lists, so this bounds its reads), at
#: most MAX_WORDS, and at least MIN_POINTS_PER_WORD training descriptors per word.
MIN_WORDS, MAX_WORDS, ENTRIES_PER_WORD, MIN_POINTS_PER_WORD = 16_384, 262_144, 8_000, 8


def asmk_words_for(n_images: int | None, max_local: int, opts) -> int:
    """The codebook size for a collection of ``n_images`` (about 0.9 entries per kept feature)."""
    if opts.asmk_words:
        return int(opts.asmk_words)
    want = int(0.9 * max_local * (n_images or 0) / ENTRIES_PER_WORD)
    return int(min(MAX_WORDS, max(MIN_WORDS, want)))


def asmk_sample_size(words: int, opts) -> int:
    """Local descriptors to fit a codebook of ``words`` words on."""
    return int(min(opts.asmk_train, max(opts.train_local, MIN_POINTS_PER_WORD * words)))


def fit_codebook(sample: np.ndarray, words: int, opts, log=print):
    """A codebook of about ``words`` words (fewer when ``sample`` is small) in ``asmk_coarse`` cells."""
    from delg_geo.index.asmk import Codebook

    t = time.perf_counter()
    fine = -(-int(words) // opts.asmk_coarse)
    cb = Codebook.fit(sample, opts.asmk_coarse, fine, seed=opts.seed, min_points=MIN_POINTS_PER_WORD)
    log(f"ASMK codebook: {cb.size} words in {len(cb.coarse)} cells from {len(sample)} local descriptors "
        f"({time.perf_counter() - t:.0f} s)")
    return cb


def _base_codebook(base: Path, base_m, codec, opts, log, n_images: int | None = None):
    """The base index's codebook (its words stay the same), or one fitted on its stored features."""
    from delg_geo.index.asmk import CODEBOOK, Codebook

    if base_m.asmk and (base / CODEBOOK).is_file():
        return Codebook.load(base / CODEBOOK)
    words = asmk_words_for(n_images or base_m.num_images, int(base_m.local.get("max_features", opts.max_local)), opts)
    sample = stored_feature_sample(base, codec, asmk_sample_size(words, opts), opts.seed)
    return fit_codebook(sample, words, opts, log) if len(sample) else None


def stored_feature_sample(index_dir: Path, codec, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` of a compact index's stored local descriptors, decoded, drawn at random (seeded)."""
    codes = np.load(Path(index_dir) / "local_codes.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(codes), min(len(codes), int(n)), replace=False))
    return codec.decode(np.asarray(codes[rows])) if len(rows) else np.zeros((0, 1), np.float32)


def _asmk_from_codes(asmk, codec, counts: np.ndarray, codes: np.ndarray, images: int = 2000) -> None:
    """Aggregates the stored (decoded) features of ``counts`` images, a few thousand at a time."""
    off = np.concatenate([[0], np.cumsum(counts)])
    for a in range(0, len(counts), images):
        b = min(len(counts), a + images)
        asmk.add(counts[a:b], codec.decode(np.asarray(codes[off[a] : off[b]])))

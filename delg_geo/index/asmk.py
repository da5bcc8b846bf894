"""Stage 3b — search by local features: a binarised ASMK inverted file.

At a million photos the global descriptor alone loses the right photo: a million other vectors
crowd the top 100 (docs/results.md). The local features then find candidates of
their own, as DELG does with ASMK (Tolias et al., "To aggregate or not to aggregate", 2013):

* **Visual words.** A two-level codebook (k-means into ``coarse`` cells, then k-means into up to
  ``fine`` words inside each cell) is fitted on a sample of the index's local descriptors, in the
  store's matching space (decoded codes, as verification sees them); the build sizes it to the
  collection (``index_builder.assemble.asmk_words_for``: at least ``MIN_WORDS``, about one word
  per ``ENTRIES_PER_WORD`` entries above).
* **One entry per image and word.** An image's descriptors that fall in the same word are
  aggregated: their residuals to the word's centre are summed and binarised, one bit per
  dimension (ASMK*; DELG binarises its local descriptors the same way). An entry is 4 + D/8
  bytes (the image id, the signature).
* **Inverted file.** Entries sorted by word (``asmk_ids.npy``, ``asmk_sigs.npy``), with each
  word's start in ``asmk_offsets.npy`` and each image's entry count in ``asmk_counts.npy``.
  A query reads only its words' lists, with ``pread``, and scores them a batch of lists at a
  time (``BATCH_ENTRIES``: memory stays flat).
* **Score.** Per shared word, ``h = 1 - 2 hamming / D`` and the selective kernel
  ``h ** alpha`` when ``h > tau`` (ASMK's published ``alpha = 3``, ``tau = 0``, kept: on the
  collection's own photos at a million images, ``tools/shortlist_recall.py``, ``alpha = 2`` found
  3.6 points more right photos in the top 100 and 1 point fewer at the top, ``tau = 0.3`` none more);
  an image's score is the sum over shared words over ``sqrt(n_query_words * n_image_words)``.

``index_builder/inverted_file.py`` writes it: entries go into word-range buckets as images stream
in and one bucket is sorted at a time (an external sort: a 5-million-image index never holds its
entries in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delg_geo.core.errors import IndexFormatError
from delg_geo.index.rowfile import NpyRows

CODEBOOK = "asmk_codebook.npz"
#: Posting-list entries scored at once by a search (about 20 bytes of temporaries each).
BATCH_ENTRIES = 1 << 19


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """(k, D) centres of a seeded Lloyd k-means on ``x`` (started from k distinct points; an
    emptied cluster keeps its centre)."""
    x = np.ascontiguousarray(x, np.float32)
    k = int(max(1, min(k, len(x))))
    rng = np.random.default_rng(seed)
    c = x[np.sort(rng.choice(len(x), k, replace=False))].copy()
    for _ in range(iters):
        a = nearest(x, c)
        sums = np.zeros_like(c, dtype=np.float64)
        np.add.at(sums, a, x)
        n = np.bincount(a, minlength=k)
        moved = n > 0
        new = c.copy()
        new[moved] = (sums[moved] / n[moved, None]).astype(np.float32)
        if np.allclose(new, c):
            break
        c = new
    return c


def nearest(x: np.ndarray, c: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of each row of ``x``'s nearest row of ``c`` (squared L2), in chunks of rows."""
    c2 = (c * c).sum(1)
    out = np.empty(len(x), np.int64)
    for a in range(0, len(x), chunk):
        xa = x[a : a + chunk]
        out[a : a + chunk] = np.argmin(c2[None, :] - 2.0 * (xa @ c.T), axis=1)
    return out


@dataclass
class Codebook:
    coarse: np.ndarray  # (K1, D) float32
    fine: np.ndarray  # (K, D) float32: the words, grouped by coarse cell
    cell_start: np.ndarray  # (K1 + 1,) int64: cell c's words are fine[cell_start[c]:cell_start[c + 1]]

    @property
    def size(self) -> int:
        return len(self.fine)

    @property
    def dim(self) -> int:
        return int(self.fine.shape[1])

    @classmethod
    def fit(cls, x: np.ndarray, coarse: int = 256, fine: int = 64, seed: int = 0, min_points: int = 8) -> "Codebook":
        """Up to ``coarse`` cells of at least ``fine * min_points`` sample points each, then up to
        ``fine`` words in each cell, with at least ``min_points`` sample points per word."""
        x = np.ascontiguousarray(x, np.float32)
        k1 = int(max(1, min(coarse, len(x) // max(1, fine * min_points))))
        c1 = kmeans(x, k1, seed)
        a = nearest(x, c1)
        words, start = [], [0]
        for c in range(len(c1)):
            xc = x[a == c]
            k2 = int(max(1, min(fine, len(xc) // min_points)))
            words.append(kmeans(xc, k2, seed + 1 + c, iters=15) if len(xc) else c1[c : c + 1])
            start.append(start[-1] + len(words[-1]))
        return cls(c1, np.concatenate(words).astype(np.float32), np.asarray(start, np.int64))

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The word of each row of ``x``: its nearest cell, then the nearest word in that cell."""
        x = np.ascontiguousarray(x, np.float32)
        cell = nearest(x, self.coarse)
        out = np.empty(len(x), np.int64)
        order = np.argsort(cell, kind="stable")
        bounds = np.searchsorted(cell[order], np.arange(len(self.coarse) + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[c] : bounds[c + 1]]
            a, b = self.cell_start[c], self.cell_start[c + 1]
            out[rows] = a + nearest(x[rows], self.fine[a:b])
        return out

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, coarse=self.coarse, fine=self.fine, cell_start=self.cell_start)

    @classmethod
    def load(cls, path: Path) -> "Codebook":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["coarse"].astype(np.float32), z["fine"].astype(np.float32), z["cell_start"].astype(np.int64))


def aggregate(codebook: Codebook, x: np.ndarray, words: np.ndarray | None = None,
              image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, word, signature) entries, sorted by image then word, of descriptors ``x`` (their
    words, if known, and the image each belongs to; one image when ``image`` is None).
    Signatures are the packed signs of the per-(image, word) summed residuals."""
    x = np.asarray(x, np.float32)
    w = codebook.assign(x) if words is None else np.asarray(words, np.int64)
    img = np.zeros(len(x), np.int64) if image is None else np.asarray(image, np.int64)
    key = img * codebook.size + w
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    resid = x[order] - codebook.fine[w[order]]
    sums = np.add.reduceat(resid, first, axis=0) if len(first) else np.zeros((0, codebook.dim), np.float32)
    k = key[first]
    return k // codebook.size, k % codebook.size, np.packbits(sums > 0, axis=1)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray, dim: int) -> np.ndarray:
    """``1 - 2 hamming / dim`` between packed signatures, row by row (broadcasting)."""
    x = np.bitwise_xor(sig_a, sig_b)
    ham = np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
    return 1.0 - 2.0 * ham / dim


def kernel(h: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    return np.where(h > tau, np.abs(h) ** alpha * np.sign(h), 0.0)


class InvertedFile:
    """The index's ASMK inverted file, opened for queries (lists read with ``pread``)."""

    def __init__(self, index_dir: Path, n_images: int, info: dict):
        self.path = Path(index_dir)
        self.codebook = Codebook.load(self.path / CODEBOOK)
        self.offsets = np.load(self.path / "asmk_offsets.npy")
        self.counts = np.load(self.path / "asmk_counts.npy").astype(np.float64)
        self.ids = NpyRows(self.path / "asmk_ids.npy")
        self.sigs = NpyRows(self.path / "asmk_sigs.npy")
        self.alpha, self.tau = float(info.get("alpha", 3.0)), float(info.get("tau", 0.0))
        d = self.codebook.dim
        self.table = kernel(1.0 - 2.0 * np.arange(d + 1) / d, self.alpha, self.tau)
        if (len(self.offsets) != self.codebook.size + 1 or len(self.counts) != n_images or self.offsets[0] != 0
                or self.offsets[-1] != len(self.ids) or len(self.sigs) != len(self.ids) or np.any(np.diff(self.offsets) < 0)):
            from delg_geo.index.integrity import damaged_message

            raise IndexFormatError(damaged_message(self.path, "asmk_offsets.npy", "does not match the inverted file's arrays"))

    def _damaged(self, name: str, why: str) -> str:
        from delg_geo.index.integrity import damaged_message

        return damaged_message(self.path, name, why)

    def problem(self, chunk: int = 1 << 24) -> tuple[str, str] | None:
        """(file, why) the inverted file cannot be trusted (reads all of it), or None: every id
        names an image, and each image holds as many entries as its count says."""
        n = len(self.counts)
        seen = np.zeros(n, np.int64)
        for a in range(0, len(self.ids), chunk):
            ids = self.ids.rows(a, a + chunk)
            if len(ids) and int(ids.max()) >= n:
                return "asmk_ids.npy", f"holds image id {int(ids.max())}, beyond the {n} images"
            seen += np.bincount(ids, minlength=n)
        if not np.array_equal(seen, self.counts.astype(np.int64)):
            return "asmk_ids.npy", "does not match asmk_counts.npy (entries per image)"
        return None

    def search(self, vectors: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids, scores) for one image's local descriptors (in the store's matching
        space); images sharing no word with them are never returned."""
        x = np.asarray(vectors, np.float32)
        if len(x) == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        _, words, sigs = aggregate(self.codebook, x)
        a, b = self.offsets[words], self.offsets[words + 1]
        have = b > a
        if not have.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        a, b, q = a[have], b[have], sigs[have]
        step = next(u for u in (8, 4, 2, 1) if q.shape[1] % u == 0)  # compare signatures a machine word at a time
        unit = np.dtype(f"u{step}")
        qv = np.ascontiguousarray(q).view(unit)
        n = len(self.counts)
        score = np.zeros(n)
        lengths = b - a
        j = 0
        while j < len(a):  # a batch of posting lists at a time: temporaries stay near BATCH_ENTRIES
            stop = j + 1
            total = int(lengths[j])
            while stop < len(a) and total + int(lengths[stop]) <= BATCH_ENTRIES:
                total += int(lengths[stop])
                stop += 1
            sigs_b = np.concatenate([self.sigs.rows(s, e) for s, e in zip(a[j:stop], b[j:stop])]).view(unit)
            bits = np.bitwise_count(np.bitwise_xor(sigs_b, np.repeat(qv[j:stop], lengths[j:stop], axis=0)))
            ham = bits[:, 0].astype(np.int32)
            for c in range(1, bits.shape[1]):
                ham += bits[:, c]
            w = self.table[ham]  # the kernel of every possible distance, looked up
            hit = w != 0
            ids = np.concatenate([self.ids.rows(s, e) for s, e in zip(a[j:stop], b[j:stop])])
            if len(ids) and int(ids.max()) >= n:
                raise IndexFormatError(self._damaged("asmk_ids.npy", f"holds image id {int(ids.max())}, beyond the {n} images"))
            np.add.at(score, ids[hit].astype(np.int64), w[hit])
            j = stop
        if exclude is not None and len(exclude):
            score[np.asarray(exclude, np.int64)] = 0.0
        cand = np.flatnonzero(score > 0)
        out = score[cand] / np.sqrt(self.counts[cand] * len(words))
        if len(cand) > k:
            top = np.argpartition(-out, k - 1)[:k]
            cand, out = cand[top], out[top]
        order = np.lexsort((cand, -out))
        return cand[order].astype(np.int64), out[order].astype(np.float32)

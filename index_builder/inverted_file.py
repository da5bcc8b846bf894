"""Writes an index's ASMK inverted file (the format: ``delg_geo/index/asmk.py``).

Entries (image, word, signature) stream in, in image order, part by part as the assembly reads
them; each goes to one of 64 word-range bucket files in ``asmk.tmp/``. ``finish`` then sorts one
bucket at a time by word (ids stay increasing within a word) and appends it to the final arrays,
so memory is one bucket: about 500 MB at 5 million images. The buckets take about 14 bytes an
entry on disk until the sort is done.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from delg_geo.index.asmk import CODEBOOK, Codebook, aggregate

from index_builder.npy_appender import NpyAppender


class InvertedFileWriter:
    """Streams (image, word, signature) entries in image order into word-range buckets, then
    writes the sorted inverted file (``finish``). Image ids must come in increasing order."""

    def __init__(self, folder: Path, codebook: Codebook, buckets: int = 64):
        self.folder = Path(folder)
        self.codebook = codebook
        self.tmp = self.folder / "asmk.tmp"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.nb = int(max(1, min(buckets, codebook.size)))
        self.width = -(-codebook.dim // 8)
        self.edges = np.linspace(0, codebook.size, self.nb + 1).astype(np.int64)
        self.files = [[open(self.tmp / f"{b}.{kind}", "wb") for kind in ("ids", "words", "sigs")] for b in range(self.nb)]
        self.counts: list[np.ndarray] = []
        self.n_images = 0

    def add(self, counts: np.ndarray, vectors: np.ndarray, words: np.ndarray | None = None) -> None:
        """Images with ``counts`` local features each, their (decoded) descriptors in order, and
        their words when known."""
        counts = np.asarray(counts, np.int64)
        img = np.repeat(np.arange(len(counts)), counts)
        i, w, s = aggregate(self.codebook, vectors, words, img)
        self.add_entries(len(counts), i, w, s)

    def add_entries(self, n_images: int, image: np.ndarray, words: np.ndarray, sigs: np.ndarray) -> None:
        """Entries already aggregated: ``image`` in 0..n_images-1 (sorted), their words and packed signatures."""
        image = np.asarray(image, np.int64)
        c = np.bincount(image, minlength=n_images)
        self.counts.append(c.astype(np.uint16 if c.max(initial=0) < 2**16 else np.uint32))
        ids = (image + self.n_images).astype(np.uint32)
        b = np.searchsorted(self.edges, np.asarray(words, np.int64), side="right") - 1
        order = np.argsort(b, kind="stable")
        bounds = np.searchsorted(b[order], np.arange(self.nb + 1))
        w32 = np.asarray(words, np.uint32)
        sigs = np.ascontiguousarray(sigs, np.uint8)
        for k in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[k] : bounds[k + 1]]
            f_ids, f_words, f_sigs = self.files[k]
            f_ids.write(ids[rows].tobytes())
            f_words.write(w32[rows].tobytes())
            f_sigs.write(sigs[rows].tobytes())
        self.n_images += int(n_images)

    def finish(self) -> dict:
        """Writes the inverted file's arrays into ``folder``; returns the manifest's summary."""
        for fs in self.files:
            for f in fs:
                f.close()
        out_ids = NpyAppender(self.folder / "asmk_ids.npy", np.uint32, None)
        out_sigs = NpyAppender(self.folder / "asmk_sigs.npy", np.uint8, self.width)
        per_word = np.zeros(self.codebook.size, np.int64)
        for k in range(self.nb):
            ids = np.fromfile(self.tmp / f"{k}.ids", np.uint32)
            words = np.fromfile(self.tmp / f"{k}.words", np.uint32)
            sigs = np.fromfile(self.tmp / f"{k}.sigs", np.uint8).reshape(-1, self.width)
            order = np.argsort(words, kind="stable")  # ids stay increasing within a word
            out_ids.append(ids[order])
            out_sigs.append(sigs[order])
            per_word += np.bincount(words, minlength=self.codebook.size)
        out_ids.close()
        out_sigs.close()
        shutil.rmtree(self.tmp)
        np.save(self.folder / "asmk_offsets.npy", np.concatenate([[0], np.cumsum(per_word)]).astype(np.int64))
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.uint16)
        np.save(self.folder / "asmk_counts.npy", counts)
        self.codebook.save(self.folder / CODEBOOK)
        n = int(per_word.sum())
        return dict(kind="asmk-binary", words=self.codebook.size, cells=len(self.codebook.coarse), dim=self.codebook.dim,
                    alpha=3.0, tau=0.0, entries=n, entries_per_image=round(n / max(1, self.n_images), 1),
                    bytes_per_entry=4 + self.width)

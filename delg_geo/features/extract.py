"""Stage 1 — extract: batched, prefetching feature extraction over many image files.

Images are decoded by a thread pool one window ahead of the network, grouped by size so that
same-sized images share a forward pass, and every failure is reported per file, never raised
for the whole batch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from delg_geo.core.errors import ImageLoadError
from delg_geo.core.runtime import available_cpus
from delg_geo.features.base import Features, features_problem
from delg_geo.features.images import MIN_IMAGE_SIDE, LoadedImage, load_image


@dataclass
class ExtractResult:
    index: int  # position in the input sequence
    path: str
    features: Features | None
    error: str | None  # one line naming the file, when it could not be used
    seconds: float  # this image's share of decode + network time

    @property
    def ok(self) -> bool:
        return self.features is not None


def min_image_side(extractor) -> int:
    """The shorter side, in pixels, below which ``extractor`` cannot describe an image."""
    return int(getattr(extractor, "min_image_side", MIN_IMAGE_SIDE))


def _decode(path: str | Path, max_side: int, min_side: int = MIN_IMAGE_SIDE) -> tuple[LoadedImage | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return load_image(path, max_side=max_side, min_side=min_side), None, time.perf_counter() - t0
    except ImageLoadError as e:
        return None, str(e), time.perf_counter() - t0


def _run_batch(extractor, images: Sequence[LoadedImage]) -> list[Features]:
    batch_fn = getattr(extractor, "extract_batch", None)
    if batch_fn is not None:
        return list(batch_fn(list(images)))
    return [extractor.extract(im) for im in images]


def _run_part(extractor, images, names):
    """Extract one batch; a failure is retried image by image so one bad image costs only itself."""
    t0 = time.perf_counter()
    try:
        feats = _run_batch(extractor, images)
        errors = [None] * len(images)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        feats, errors = [], []
        for im, name in zip(images, names):
            try:
                feats.append(extractor.extract(im))
                errors.append(None)
            except KeyboardInterrupt:
                raise
            except Exception as e1:  # noqa: BLE001
                feats.append(None)
                errors.append(f"{name}: feature extraction failed ({e1 or e})")
    return feats, errors, time.perf_counter() - t0


def iter_extract(
    paths: Iterable[str | Path],
    extractor,
    batch_size: int = 4,
    window: int = 32,
    workers: int = 2,
    progress: bool | str = False,
    net_workers: int | None = None,
) -> Iterator[ExtractResult]:
    """Yield one :class:`ExtractResult` per path, in input order.

    ``window`` paths are decoded in parallel while the previous window runs through the network;
    inside a window, images of equal size are batched ``batch_size`` at a time, and
    ``net_workers`` batches (default: one per available CPU, at most 4;
    :func:`delg_geo.core.runtime.available_cpus`) run through the network concurrently, which
    keeps both cores of a small machine busy where one forward pass alone does not.
    """
    paths = [str(p) for p in paths]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=progress if isinstance(progress, str) else "extract", unit="img")
    max_side = extractor.max_side
    min_side = min_image_side(extractor)
    net_workers = net_workers or min(4, available_cpus())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, ThreadPoolExecutor(max_workers=net_workers) as net:
        chunks = [list(range(i, min(i + window, len(paths)))) for i in range(0, len(paths), window)]
        pending = None
        for ci, chunk in enumerate(chunks):
            if pending is None:
                pending = [pool.submit(_decode, paths[i], max_side, min_side) for i in chunk]
            decoded = [f.result() for f in pending]
            # start decoding the next window while the network works on this one
            pending = (
                [pool.submit(_decode, paths[i], max_side, min_side) for i in chunks[ci + 1]] if ci + 1 < len(chunks) else None
            )
            results: dict[int, ExtractResult] = {}
            by_size: dict[tuple[int, int], list[int]] = {}
            for j, (img, err, dt) in enumerate(decoded):
                i = chunk[j]
                if img is None:
                    results[i] = ExtractResult(i, paths[i], None, err, dt)
                else:
                    by_size.setdefault(img.array.shape[:2], []).append(j)
            batches = [
                members[k : k + batch_size] for members in by_size.values() for k in range(0, len(members), batch_size)
            ]
            futures = {net.submit(_run_part, extractor, [decoded[j][0] for j in part], [paths[chunk[j]] for j in part]): part
                       for part in batches}
            if bar is not None and len(results):
                bar.update(len(results))  # images that could not be decoded are done
            pos = 0  # results are yielded in input order, as soon as every earlier one is ready
            for fut in as_completed(futures):
                part = futures[fut]
                feats, errors, seconds = fut.result()
                share = seconds / len(part)
                for j, f, err in zip(part, feats, errors):
                    i = chunk[j]
                    why = features_problem(f) if f is not None else None
                    if why:  # never index (or answer from) an image the network could not describe
                        f, err = None, f"{paths[i]}: {why}"
                    results[i] = ExtractResult(i, paths[i], f, err, share + decoded[j][2])
                if bar is not None:
                    bar.update(len(part))  # the bar moves as each batch is done, not once per window
                while pos < len(chunk) and chunk[pos] in results:
                    yield results[chunk[pos]]
                    pos += 1
            for i in chunk[pos:]:
                yield results[i]
    if bar is not None:
        bar.close()

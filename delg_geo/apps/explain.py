"""Why this answer: the query beside its verified neighbour, with the inlier matches drawn as lines.

:func:`draw_explain` draws a given set of matches (Pillow only). :func:`explain_prediction`
re-extracts the query's features, re-verifies it against the prediction's neighbour from the
index, and draws the inliers of that verification.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from delg_geo.features.images import LoadedImage, load_image

DISPLAY_HEIGHT = 480  # both photos are scaled to this height
MAX_LINES = 250  # more inliers than this: an evenly spread sample is drawn
GAP = 12
HEADER = 28


def _load(src, max_side: int) -> LoadedImage:
    if isinstance(src, LoadedImage):
        return src
    return load_image(src, max_side=max_side)


def _colours(n: int) -> list[tuple[int, int, int]]:
    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def render_explain(
    query_image,
    neighbour_image,
    query_keypoints: np.ndarray,
    neighbour_keypoints: np.ndarray,
    inlier_pairs: np.ndarray,
    height: int = DISPLAY_HEIGHT,
    max_lines: int = MAX_LINES,
    caption: str | None = None,
) -> Image.Image:
    """The match picture as a PIL image (see :func:`draw_explain`)."""
    q = _load(query_image, max_side=2 * height)
    n = _load(neighbour_image, max_side=2 * height)
    tiles, factors = [], []
    for im in (q, n):
        h, w = im.array.shape[:2]
        f = height / float(h)
        tiles.append(Image.fromarray(im.array).resize((max(1, round(w * f)), height), Image.BILINEAR))
        # keypoints are in original-image pixels: original -> array (im.scale) -> display (f)
        factors.append(im.scale * f)
    W = tiles[0].width + GAP + tiles[1].width
    canvas = Image.new("RGB", (W, height + HEADER), (255, 255, 255))
    canvas.paste(tiles[0], (0, HEADER))
    x_off = tiles[0].width + GAP
    canvas.paste(tiles[1], (x_off, HEADER))

    pairs = np.asarray(inlier_pairs, np.int64).reshape(-1, 2)
    qk = np.asarray(query_keypoints, np.float64).reshape(-1, 2)
    nk = np.asarray(neighbour_keypoints, np.float64).reshape(-1, 2)
    pairs = pairs[(pairs[:, 0] >= 0) & (pairs[:, 0] < len(qk)) & (pairs[:, 1] >= 0) & (pairs[:, 1] < len(nk))]
    total = len(pairs)
    if total > max_lines:
        pairs = pairs[np.linspace(0, total - 1, max_lines).round().astype(int)]
    draw = ImageDraw.Draw(canvas)
    r = 3
    for (i, j), col in zip(pairs, _colours(len(pairs))):
        x1, y1 = qk[i] * factors[0]
        x2, y2 = nk[j] * factors[1]
        y1 += HEADER
        y2 += HEADER
        x2 += x_off
        draw.line([(x1, y1), (x2, y2)], fill=col, width=1)
        draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], outline=col, width=2)
        draw.ellipse([x2 - r, y2 - r, x2 + r, y2 + r], outline=col, width=2)
    text = caption if caption is not None else f"{total} inlier matches" + (f" ({len(pairs)} drawn)" if total > len(pairs) else "")
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((6, 5), "query", fill=(0, 0, 0), font=font)
    draw.text((x_off + 6, 5), "verified neighbour", fill=(0, 0, 0), font=font)
    tw = draw.textlength(text, font=font)
    draw.text((W - tw - 6, 5), text, fill=(90, 90, 90), font=font)
    return canvas


def draw_explain(
    query_image_path,
    neighbour_image_path,
    query_keypoints: np.ndarray,
    neighbour_keypoints: np.ndarray,
    inlier_pairs: np.ndarray,
    path: str | Path,
    caption: str | None = None,
) -> Path:
    """Draw the query (left) beside the verified neighbour (right) with inlier matches as lines; PNG.

    Images may be paths, raw bytes or :class:`~delg_geo.features.images.LoadedImage`. Keypoints are
    (K, 2) x/y in *original-image* pixels (as extractors and the index store them), and
    ``inlier_pairs`` is ``Verification.inlier_pairs``: (query feature index, neighbour feature index).
    """
    img = render_explain(query_image_path, neighbour_image_path, query_keypoints, neighbour_keypoints,
                         inlier_pairs, caption=caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return path


def verify_against(geolocator, feats, neighbour_id: int):
    """Re-run the locator's verification of ``feats`` against index image ``neighbour_id``.

    Returns ``(query_keypoints, neighbour_keypoints, Verification)``.
    """
    from delg_geo.retrieval.verify import verify_pair

    vc = geolocator.config.verify_config
    index = geolocator.index
    q_kp = feats.keypoints[: vc.max_features]
    q_desc = index.query_local(feats.local_descriptors[: vc.max_features])
    kp, desc = index.local_features(int(neighbour_id))
    v = verify_pair(q_kp, q_desc, kp, desc, vc, feats.image_size, index.image_size(int(neighbour_id)))
    return q_kp, kp, v


def explain_prediction(geolocator, query_path, prediction, path: str | Path):
    """Draw why ``prediction`` (a ``Prediction`` or its dict) was made for the photo ``query_path``.

    Re-extracts the query's features, verifies them against the prediction's neighbour (the
    verification is re-run, so RANSAC may find a slightly different inlier set than the query did)
    and writes the PNG to ``path``. Returns the :class:`~delg_geo.retrieval.verify.Verification`.
    """
    from delg_geo.evaluation.mapview import reference_path

    img = query_path if isinstance(query_path, LoadedImage) else load_image(query_path, max_side=geolocator.extractor.max_side)
    feats = geolocator.extractor.extract(img)
    nb = prediction["neighbour"] if isinstance(prediction, dict) else prediction.neighbour
    nid = int(nb["id"] if isinstance(nb, dict) else nb.id)
    q_kp, kp, v = verify_against(geolocator, feats, nid)
    npath = reference_path(geolocator.index, nid)
    if npath is None:
        from delg_geo.core.errors import DelgGeoError

        raise DelgGeoError(f"the photo of index image {nid} is not on disk any more; cannot draw the matches")
    draw_explain(img, npath, q_kp, kp, v.inlier_pairs, path)
    return v

"""Why this answer: the query beside the answer's neighbour, with the inlier matches drawn as lines.

:func:`draw_explain` draws a given set of matches (Pillow only). :func:`explain_prediction`
verifies the query's features (the very ones the answer came from, when given) against the
prediction's neighbour from the index and draws the inliers of that verification; the
verification is deterministic, so the picture shows the inlier count the answer reports. The
header says what the answer is: a verified neighbour, or a global answer (no candidate reached
the inlier threshold) whose neighbour is only the most similar photo.
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
HEADER = 50  # two lines: the photos' labels, then what the answer is


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
    verified: bool = True,
) -> Image.Image:
    """The match picture as a PIL image (see :func:`draw_explain`). ``verified=False`` labels the
    neighbour as not verified (a global answer)."""
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
    drawn = f" ({len(pairs)} drawn)" if total > len(pairs) else ""
    text = (caption if caption is not None else f"{total} inlier matches") + drawn
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((6, 5), "query", fill=(0, 0, 0), font=font)
    draw.text((x_off + 6, 5), "verified neighbour" if verified else "neighbour (not verified)",
              fill=(0, 0, 0) if verified else (170, 40, 20), font=font)
    while len(text) > 20 and draw.textlength(text, font=font) > W - 12:  # a narrow picture: cut, never overflow
        text = text[: int(len(text) * 0.9)].rstrip() + "..."
    draw.text((6, 27), text, fill=(90, 90, 90), font=font)
    return canvas


def answer_caption(method: str, inliers: int, min_inliers: int, note: str = "") -> str:
    """What the match picture says the answer is: ``answer: verified neighbour, 68 inlier matches``,
    or for a global answer ``answer: global (not verified: no candidate reached 15 inliers (the
    most: 7, ...); ...): this photo has 5 inlier matches``. The counts are the answer's own."""
    if method == "verified":
        return f"answer: verified neighbour, {inliers} inlier matches"
    why = note.split("; answered with")[0] if note else f"fewer than {min_inliers} inliers"
    return f"answer: global, not verified ({why}); this photo: {inliers} inlier matches"


def draw_explain(
    query_image_path,
    neighbour_image_path,
    query_keypoints: np.ndarray,
    neighbour_keypoints: np.ndarray,
    inlier_pairs: np.ndarray,
    path: str | Path,
    caption: str | None = None,
    verified: bool = True,
) -> Path:
    """Draw the query (left) beside the verified neighbour (right) with inlier matches as lines; PNG.

    Images may be paths, raw bytes or :class:`~delg_geo.features.images.LoadedImage`. Keypoints are
    (K, 2) x/y in *original-image* pixels (as extractors and the index store them), and
    ``inlier_pairs`` is ``Verification.inlier_pairs``: (query feature index, neighbour feature index).
    """
    img = render_explain(query_image_path, neighbour_image_path, query_keypoints, neighbour_keypoints,
                         inlier_pairs, caption=caption, verified=verified)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return path


def verify_against(geolocator, feats, neighbour_id: int):
    """Re-run the locator's verification of ``feats`` against index image ``neighbour_id``.

    Returns ``(query_keypoints, neighbour_keypoints, Verification)``.
    """
    from delg_geo.core.runtime import single_threaded_blas
    from delg_geo.retrieval.verify import verify_pair

    vc = geolocator.config.verify_config
    index = geolocator.index
    q_kp = feats.keypoints[: vc.max_features]
    q_desc = index.query_local(feats.local_descriptors[: vc.max_features])
    kp, desc = index.local_features(int(neighbour_id))
    with single_threaded_blas():  # as the query's own verification ran: the same inliers
        v = verify_pair(q_kp, q_desc, kp, desc, vc, feats.image_size, index.image_size(int(neighbour_id)))
    return q_kp, kp, v


def explain_prediction(geolocator, query_path, prediction, path: str | Path, features=None):
    """Draw why ``prediction`` (a ``Prediction`` or its dict) was made for the photo ``query_path``.

    Draws the inlier matches of the answer's own verification of its neighbour
    (``Prediction.matches``), so the picture shows the inlier count the answer reports. Without
    them (a dict, or verification off) the query's ``features`` (extracted again when not given)
    are verified against the neighbour here; RANSAC is randomised, so that count may differ by a
    few. The picture is headed with what the answer is (:func:`answer_caption`) and written as a
    PNG to ``path``. Returns the :class:`~delg_geo.retrieval.verify.Verification` drawn.
    """
    from delg_geo.evaluation.mapview import reference_path
    from delg_geo.retrieval.verify import Verification

    img = query_path if isinstance(query_path, LoadedImage) else load_image(query_path, max_side=geolocator.extractor.max_side)
    d = prediction if isinstance(prediction, dict) else prediction.to_dict()
    nid = int(d["neighbour"]["id"])
    matches = None if isinstance(prediction, dict) else prediction.matches
    if matches is not None:
        n = len(matches)
        q_kp, kp = matches[:, :2], matches[:, 2:]
        v = Verification(n, n, np.stack([np.arange(n), np.arange(n)], axis=1))
    else:
        feats = features if features is not None else geolocator.extractor.extract(img)
        q_kp, kp, v = verify_against(geolocator, feats, nid)
    npath = reference_path(geolocator.index, nid)
    if npath is None:
        from delg_geo.core.errors import DelgGeoError

        raise DelgGeoError(f"the photo of index image {nid} is not on disk any more; cannot draw the matches")
    caption = answer_caption(d.get("method", "verified"), v.inliers, geolocator.rule.min_inliers, d.get("note", ""))
    draw_explain(img, npath, q_kp, kp, v.inlier_pairs, path, caption=caption, verified=d.get("method") == "verified")
    return v

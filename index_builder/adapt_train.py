"""Training an adapted global descriptor on pairs mined from the index (``index adapt``).

* **Split.** Photos are split by place into training and held-out ones: each ~500 m cell of the
  map goes whole to one side (``holdout`` of the cells held out, seeded), so no held-out photo
  has a training photo of its own place.
* **Tuples** (Radenović et al.): each epoch, ``tuples_per_epoch`` training photos that have a
  verified partner are anchors; the positive is one of its verified partners at random; the
  ``negatives`` are re-mined with the current model: the training photos most similar to the
  anchor that lie at least ``negative_km`` away, do not verify with it, and belong to distinct
  places.
* **Loss:** ``contrastive`` (squared distance of the positive, squared hinge of each negative's
  distance under ``margin``) or ``softmax`` (cross-entropy of the positive among the negatives at
  ``temperature``), plus an L2 pull of every weight towards where training started.
* **Choice on self-queries.** Before training and after each epoch, the held-out photos are
  searched among all photos (near-duplicates left out, as calibration does) and the recall of a
  right photo (within the radius) at 1, 10 and 100 is recorded; the epoch with the best mean of the
  three is kept (epoch 0, the unadapted descriptor, included; ties go to the later epoch). Each epoch is checkpointed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from delg_geo.core.geo import haversine_km
from index_builder.adapt_model import embed_ids, load_state, model_state
from index_builder.work import _kill_point

CELL_DEG = (0.0045, 0.0064)  # about 500 m x 500 m at mid latitudes


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    tuples_per_epoch: int = 500
    batch: int = 8  # tuples per step
    negatives: int = 5
    loss: str = "softmax"  # or "contrastive"
    margin: float = 0.85  # contrastive: on raw GeM descriptors, as Radenović et al.
    temperature: float = 0.05
    lr: float = 1e-5
    pull: float = 1e-2  # L2 towards the starting weights
    holdout: float = 0.2  # fraction of map cells held out for choosing the epoch
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    train: np.ndarray  # (N,) bool
    queries: np.ndarray  # (q,) held-out self-query ids with a right photo
    drops: list  # per query: ids left out (its near-duplicates, itself included)
    rights: list  # per query: ids within the radius (near-duplicates excepted)
    in_sample: bool  # too few held-out photos: queries drawn from every photo instead


def split_photos(lats, lons, keys, radius_km: float, holdout: float, seed: int = 0, max_queries: int = 1000,
                 leave_out=None) -> Split:
    """Training photos and held-out self-queries (see the module docstring)."""
    from delg_geo.retrieval.calibrate import near_duplicates, pinned_geotags
    from delg_geo.retrieval.confidence import LeaveOut

    leave_out = leave_out or LeaveOut()
    lats, lons = np.asarray(lats, np.float64), np.asarray(lons, np.float64)
    n = len(lats)
    cells = np.stack([np.floor(lats / CELL_DEG[0]), np.floor(lons / CELL_DEG[1])], 1).astype(np.int64)
    uniq, inv = np.unique(cells, axis=0, return_inverse=True)
    rng = np.random.default_rng(seed)
    held_cells = rng.random(len(uniq)) < holdout
    held = held_cells[inv.reshape(-1)]
    eligible = ~pinned_geotags(lats, lons, keys, leave_out)
    pool = np.flatnonzero(held & eligible)
    in_sample = False
    if holdout <= 0 or len(pool) < 10 or held.all():
        held[:] = False
        pool, in_sample = np.flatnonzero(eligible), True
    queries, drops, rights = [], [], []
    for i in rng.permutation(pool):
        drop = near_duplicates(int(i), lats, lons, keys, leave_out)
        right = np.setdiff1d(np.flatnonzero(haversine_km(lats[i], lons[i], lats, lons) <= radius_km), drop)
        if len(right):
            queries.append(int(i))
            drops.append(drop)
            rights.append(right)
        if len(queries) >= max_queries:
            break
    return Split(~held, np.asarray(queries, np.int64), drops, rights, in_sample)


def recall(emb: np.ndarray, split: Split, ks=(1, 10, 100)) -> dict:
    """Held-out self-query recall at ``ks`` of the (N, d) embeddings ``emb`` of every photo."""
    if len(split.queries) == 0:
        return {f"top{k}": float("nan") for k in ks}
    sims = emb[split.queries] @ emb.T
    ranks = []
    for r in range(len(split.queries)):
        s = sims[r]
        s[split.drops[r]] = -np.inf
        best_right = s[split.rights[r]].max()
        ranks.append(int((s > best_right).sum()))
    ranks = np.asarray(ranks)
    return {f"top{k}": float((ranks < k).mean()) for k in ks}


def _tuple_loss(tf, q, p, n, cfg: TrainConfig):
    """Mean loss of tuples: ``q``, ``p`` (B, d), ``n`` (B, K, d), all L2-normalised."""
    s_qp = tf.reduce_sum(q * p, axis=1)
    s_qn = tf.einsum("bd,bkd->bk", q, n)
    if cfg.loss == "softmax":
        logits = tf.concat([s_qp[:, None], s_qn], axis=1) / cfg.temperature
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.zeros(tf.shape(q)[0], tf.int32), logits))
    d_qn = tf.sqrt(tf.maximum(2.0 - 2.0 * s_qn, 1e-12))
    return tf.reduce_mean((2.0 - 2.0 * s_qp) + tf.reduce_sum(tf.square(tf.nn.relu(cfg.margin - d_qn)), axis=1))


def hard_negatives(emb: np.ndarray, anchors: np.ndarray, pool: np.ndarray, lats, lons, places: np.ndarray, far_pairs: set,
                   k: int, negative_km: float) -> np.ndarray:
    """(len(anchors), k) the pool photos most similar to each anchor that lie ``negative_km``
    away or more, do not verify with it, and come from distinct places (-1 where too few)."""
    out = np.full((len(anchors), k), -1, np.int64)
    sims = emb[anchors] @ emb[pool].T
    for r, a in enumerate(anchors):
        s = np.where(haversine_km(lats[a], lons[a], lats[pool], lons[pool]) >= negative_km, sims[r], -np.inf)
        seen, got = set(), 0
        for o in np.argsort(-s, kind="stable")[: 20 * k + 50]:
            j = int(pool[o])
            if got >= k or not np.isfinite(s[o]):
                break
            if (min(int(a), j), max(int(a), j)) in far_pairs:
                continue
            place = int(places[j])
            if place >= 0 and place in seen:
                continue
            seen.add(place)
            out[r, got] = j
            got += 1
    return out


def _partners(positives: np.ndarray, train: np.ndarray) -> dict[int, np.ndarray]:
    keep = train[positives[:, 0]] & train[positives[:, 1]]
    pairs = positives[keep]
    both = np.concatenate([pairs, pairs[:, ::-1]])
    out: dict[int, list] = {}
    for a, b in both:
        out.setdefault(int(a), []).append(int(b))
    return {a: np.asarray(sorted(v), np.int64) for a, v in out.items()}


def train(model, inputs: dict[int, np.ndarray], mined, split: Split, lats, lons, negative_km: float, cfg: TrainConfig,
          work: Path, progress=False, log=print) -> dict:
    """Train ``model`` (:mod:`index_builder.adapt_model`) for ``cfg.epochs``, resuming from the
    checkpoints in ``work``; leave it at the chosen epoch. Returns the history (loss and held-out
    recall per epoch) and the chosen epoch."""
    import tensorflow as tf

    from delg_geo.core.progress import progress_bar

    work.mkdir(parents=True, exist_ok=True)
    lats, lons = np.asarray(lats, np.float64), np.asarray(lons, np.float64)
    all_ids = np.asarray(sorted(inputs), np.int64)
    row_of = {int(i): r for r, i in enumerate(all_ids)}
    partners = _partners(mined.positives, split.train)
    anchors_all = np.asarray([a for a in sorted(partners) if a in row_of and any(int(b) in row_of for b in partners[a])], np.int64)
    pool = np.asarray([i for i in all_ids if split.train[i]], np.int64)
    far_pairs = {(int(min(a, b)), int(max(a, b))) for a, b in mined.far_verified}
    opt = tf.keras.optimizers.Adam(cfg.lr)
    hist_path = work / "history.json"
    history = json.loads(hist_path.read_text()) if hist_path.exists() else []
    start = len(history) - 1  # epochs done (entry 0 is the starting point)
    if start >= 0:
        with np.load(work / f"epoch-{start:03d}.npz", allow_pickle=False) as z:
            load_state(model, {k: z[k] for k in z.files})
        log(f"adapt: resuming training after epoch {start} of {cfg.epochs}")

    def evaluate() -> dict:
        emb = _full_embedding(model, inputs, all_ids, len(lats))
        return recall(model.search_space(emb, pool), split)

    if not history:
        history.append(dict(epoch=0, loss=None, heldout=evaluate(), seconds=0.0))
        _checkpoint(work, model, history)
    for epoch in range(max(1, start + 1), cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])  # the same tuples whether resumed or not
        emb = _full_embedding(model, inputs, all_ids, len(lats))
        anchors = rng.permutation(anchors_all)[: cfg.tuples_per_epoch]
        negs = hard_negatives(emb, anchors, pool, lats, lons, mined.places, far_pairs, cfg.negatives, negative_km)
        ok = (negs >= 0).all(axis=1)
        anchors, negs = anchors[ok], negs[ok]
        pos = np.asarray([rng.choice([b for b in partners[int(a)] if int(b) in row_of]) for a in anchors], np.int64)
        losses = []
        bar = progress_bar(len(anchors), f"adapt: epoch {epoch}/{cfg.epochs}", bool(progress), unit="tuple")
        for a in range(0, len(anchors), cfg.batch):
            losses.append(_step(tf, model, opt, inputs, anchors[a : a + cfg.batch], pos[a : a + cfg.batch],
                                negs[a : a + cfg.batch], cfg))
            bar.update(len(anchors[a : a + cfg.batch]))
        bar.close()
        history.append(dict(epoch=epoch, loss=float(np.mean(losses)) if losses else None, tuples=int(len(anchors)),
                            heldout=evaluate(), seconds=round(time.perf_counter() - t0, 1)))
        log(f"adapt: epoch {epoch}: loss {history[-1]['loss']}, held-out recall {history[-1]['heldout']}")
        _checkpoint(work, model, history)
        _kill_point("adapt-epoch")
    best = choose_epoch(history)
    with np.load(work / f"epoch-{best:03d}.npz", allow_pickle=False) as z:
        load_state(model, {k: z[k] for k in z.files})
    return dict(history=history, chosen_epoch=best, anchors=int(len(anchors_all)), pool=int(len(pool)))


def choose_epoch(history: list[dict]) -> int:
    """The epoch with the best held-out recall, the mean of recall at 1, 10 and 100 (ties: the later)."""
    def key(h):
        r = h["heldout"]
        return (np.mean([np.nan_to_num(r.get(k, 0.0)) for k in ("top1", "top10", "top100")]), h["epoch"])
    return int(max(history, key=key)["epoch"])


def _step(tf, model, opt, inputs, anchors, pos, negs, cfg: TrainConfig) -> float:
    uniq = np.unique(np.concatenate([anchors, pos, negs.reshape(-1)]))
    at = {int(i): r for r, i in enumerate(uniq)}
    with tf.GradientTape() as tape:
        emb = embed_ids(model, uniq, inputs)
        q = tf.gather(emb, [at[int(i)] for i in anchors])
        p = tf.gather(emb, [at[int(i)] for i in pos])
        n = tf.reshape(tf.gather(emb, [at[int(i)] for i in negs.reshape(-1)]), (len(anchors), negs.shape[1], -1))
        loss = _tuple_loss(tf, q, p, n, cfg)
        reg = tf.add_n([tf.reduce_sum(tf.square(v - s)) for v, s in zip(model.variables, model.start)])
        total = loss + cfg.pull * reg
    grads = tape.gradient(total, model.variables)
    opt.apply_gradients(zip(grads, model.variables))
    return float(loss.numpy())


def _full_embedding(model, inputs, all_ids, n: int) -> np.ndarray:
    emb = np.asarray(embed_ids(model, all_ids, inputs))
    out = np.zeros((n, emb.shape[1]), np.float32)
    out[all_ids] = emb
    return out


def _checkpoint(work: Path, model, history: list[dict]) -> None:
    e = history[-1]["epoch"]
    tmp = work / f".epoch-{e:03d}.tmp.npz"
    np.savez(tmp, **model_state(model))
    os.replace(tmp, work / f"epoch-{e:03d}.npz")
    tmp = work / ".history.tmp"
    tmp.write_text(json.dumps(history))
    os.replace(tmp, work / "history.json")

"""Evaluation metrics for embedding models: 1:1 verification and 1:N identification.

Conventions:

* A pair score is a similarity (higher = more alike); a pair is predicted
  "same" when ``score > threshold``.
* ``labels`` are identity ids, ``groups`` are the id of the design / photo /
  session a sample comes from (e.g. the typeface of a glyph).
* ROC quantities come from scikit-learn (``roc_curve``, ``roc_auc_score``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn

__all__ = [
    "best_threshold",
    "embed",
    "far_key",
    "identification_top1",
    "make_pairs",
    "pair_scores",
    "topk_accuracy",
    "verification_metrics",
]


def far_key(far: float) -> str:
    """Result-dict key for TAR at a FAR, e.g. ``1e-3 -> "tar@far=1e-3"``."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"tar@far={mantissa}e{int(exponent)}"


def _as_pairs_arrays(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(issame).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and issame differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.size == 0:
        raise ValueError("no pairs given")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s, y


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold maximising the accuracy of ``score > threshold`` on these pairs.

    Candidates are the midpoints between consecutive distinct scores plus one
    value below the minimum (everything "same") and the maximum (everything
    "different"), so every achievable split is considered exactly once.
    Ties are broken towards the smallest threshold.

    Returns:
        ``(threshold, accuracy)``.
    """
    s, y = _as_pairs_arrays(scores, issame)
    u = np.unique(s)  # sorted distinct scores, (U,)
    candidates = np.concatenate(
        [[np.nextafter(u[0], -np.inf)], (u[:-1] + u[1:]) / 2.0, [u[-1]]]
    )  # (U + 1,)
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    true_accepts = pos.size - np.searchsorted(pos, candidates, side="right")  # pos > t
    true_rejects = np.searchsorted(neg, candidates, side="right")  # neg <= t
    acc = (true_accepts + true_rejects) / s.size
    i = int(np.argmax(acc))  # first maximum = smallest threshold
    return float(candidates[i]), float(acc[i])


def verification_metrics(
    scores: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    fars: Sequence[float] = (1e-3, 1e-4),
    seed: int = 0,
) -> dict:
    """1:1 verification metrics from pair similarity scores.

    Args:
        scores: ``(P,)`` similarity per pair (higher = more alike).
        issame: ``(P,)`` bool, True for same-identity pairs.
        n_folds: folds for the cross-validated accuracy.
        fars: false-accept rates at which to report the true-accept rate.
        seed: shuffling seed of the fold split.

    Returns:
        dict with

        * ``accuracy`` / ``accuracy_std``: mean and std over folds of the held-out
          accuracy, where each fold's threshold is the one maximising accuracy
          on the other ``n_folds - 1`` folds (stratified split when both classes
          have at least ``n_folds`` pairs, plain shuffled K-fold otherwise);
          ``fold_accuracies`` / ``fold_thresholds`` hold the per-fold values;
        * ``best_threshold`` / ``best_threshold_accuracy``: threshold maximising
          accuracy on all pairs (optimistic; use for deployment, not reporting);
        * ``auc``: ROC AUC (NaN if only one class is present);
        * ``tar@far=1e-3`` etc.: the highest TAR with FAR <= far, from the ROC
          curve.  NaN when there are fewer than ``1 / far`` negative pairs (that
          FAR cannot be resolved), with an explanation in ``notes``;
        * ``n_pairs``, ``n_pos``, ``n_neg``, ``n_folds``, ``notes`` (list of str).

    Longer than a screen: the fold loop and the ROC read share the sorted scores; the docstring
    above is most of it.
    """
    s, y = _as_pairs_arrays(scores, issame)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_folds < 2 or s.size < n_folds:
        raise ValueError(f"need n_folds >= 2 and at least n_folds pairs; got {n_folds}, {s.size}")
    notes: list[str] = []

    # k-fold accuracy with threshold selection on the training folds
    if min(n_pos, n_neg) >= n_folds:
        splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(s, y)
    else:
        notes.append(
            f"fewer than {n_folds} pairs in a class (pos={n_pos}, neg={n_neg}): "
            "folds are not stratified"
        )
        splits = KFold(n_folds, shuffle=True, random_state=seed).split(s)
    fold_acc, fold_thr = [], []
    for train, test in splits:
        thr, _ = best_threshold(s[train], y[train])
        fold_thr.append(thr)
        fold_acc.append(float(np.mean((s[test] > thr) == y[test])))
    best_thr, best_acc = best_threshold(s, y)

    out: dict = {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": fold_acc,
        "fold_thresholds": fold_thr,
        "best_threshold": best_thr,
        "best_threshold_accuracy": best_acc,
    }

    roc = roc_metrics(s, y, fars)
    out.update(roc, n_pairs=int(s.size), n_pos=n_pos, n_neg=n_neg, n_folds=n_folds, notes=notes + roc["notes"])
    return out


def roc_metrics(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = (1e-3, 1e-4)) -> dict:
    """The ROC part of :func:`verification_metrics` alone (no k-fold accuracy, which dominates the
    time on millions of pairs, e.g. IJB-C's 15.7M): ``auc``, ``tar@far=...`` (the highest TAR with
    FAR <= far; NaN when fewer than ``1 / far`` negative pairs resolve it) and ``notes``."""
    s, y = _as_pairs_arrays(scores, issame)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out: dict = {}
    notes: list[str] = []
    if n_pos == 0 or n_neg == 0:
        notes.append(f"only one class present (pos={n_pos}, neg={n_neg}): AUC and TAR undefined")
        out["auc"] = float("nan")
        for far in fars:
            out[far_key(far)] = float("nan")
    else:
        out["auc"] = float(roc_auc_score(y, s))
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        for far in fars:
            if n_neg * far < 1.0:
                out[far_key(far)] = float("nan")
                notes.append(
                    f"{far_key(far)} not reported: {n_neg} negative pairs resolve FAR only "
                    f"down to {1.0 / n_neg:.2g}; need >= {math.ceil(1.0 / far)} negatives"
                )
            else:
                out[far_key(far)] = float(tpr[fpr <= far].max())
    out["notes"] = notes
    return out


def make_pairs(
    labels: np.ndarray,
    groups: np.ndarray,
    n_pairs: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample distinct same / different-identity pairs of sample indices.

    Positive pairs are two samples of the same identity from *different* groups
    (so a pair is never an image compared with a near-copy of itself);
    negative pairs are two samples of different identities (any groups).
    Both are drawn uniformly from all such unordered pairs without repetition.

    Args:
        labels: ``(N,)`` identity per sample.
        groups: ``(N,)`` design / photo id per sample.
        n_pairs: total pairs; ``n_pairs // 2`` positives, the rest negatives.
        seed: random seed.

    Returns:
        ``pairs`` ``(n_pairs, 2)`` int64 indices (shuffled order) and
        ``issame`` ``(n_pairs,)`` bool.

    Raises:
        ValueError: if fewer distinct positive or negative pairs exist than asked.

    Longer than a screen on purpose: the nested samplers share the set of drawn pairs and one RNG
    stream, whose order fixes the pairs of every earlier run; split apart they would thread both through.
    """
    labels = np.asarray(labels).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if labels.shape != groups.shape:
        raise ValueError("labels and groups differ in length")
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    n_pos = n_pairs // 2
    n_neg = n_pairs - n_pos
    rng = np.random.default_rng(seed)
    n = labels.size

    # Count the available pairs.
    _, label_idx = np.unique(labels, return_inverse=True)  # (N,) in [0, L)
    _, group_idx = np.unique(groups, return_inverse=True)  # (N,) in [0, G)
    per_label = np.bincount(label_idx, minlength=1)  # (L,)
    per_label_group = np.zeros((per_label.size, int(group_idx.max(initial=0)) + 1), np.int64)
    np.add.at(per_label_group, (label_idx, group_idx), 1)  # (L, G)
    same_label_pairs = per_label * (per_label - 1) // 2  # (L,)
    pos_per_label = same_label_pairs - (per_label_group * (per_label_group - 1) // 2).sum(axis=1)
    total_pos = int(pos_per_label.sum())
    total_neg = n * (n - 1) // 2 - int(same_label_pairs.sum())
    if total_pos < n_pos:
        raise ValueError(f"asked for {n_pos} positive pairs, only {total_pos} exist")
    if total_neg < n_neg:
        raise ValueError(f"asked for {n_neg} negative pairs, only {total_neg} exist")

    def is_pos(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return (label_idx[i] == label_idx[j]) & (group_idx[i] != group_idx[j])

    def is_neg(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return label_idx[i] != label_idx[j]

    def enumerate_valid(valid) -> np.ndarray:
        i, j = np.triu_indices(n, k=1)
        keep = valid(i, j)
        return np.stack([i[keep], j[keep]], axis=1)  # (V, 2)

    chosen: set[tuple[int, int]] = set()

    def draw(k: int, total: int, valid, propose) -> list[tuple[int, int]]:
        """k distinct valid pairs, uniformly; rejection sampling unless k is close to total."""
        if k == 0:
            return []
        if 2 * k > total:  # dense request: enumerate all valid pairs instead
            cand = enumerate_valid(valid)
            cand = cand[[(int(a), int(b)) not in chosen for a, b in cand]]
            pick = cand[rng.choice(cand.shape[0], size=k, replace=False)]
            out = [(int(a), int(b)) for a, b in pick]
            chosen.update(out)
            return out
        out = []
        while len(out) < k:
            i, j = propose()
            key = (min(i, j), max(i, j))
            if valid(np.array(i), np.array(j)) and key not in chosen:
                chosen.add(key)
                out.append(key)
        return out

    # Positives: identity with probability proportional to its number of
    # same-identity pairs, then a uniform pair of its samples, rejected if the
    # two share a group -> uniform over all cross-group same-identity pairs.
    members = [np.flatnonzero(label_idx == k) for k in range(per_label.size)]
    weight = np.where(pos_per_label > 0, same_label_pairs, 0).astype(np.float64)
    weight /= max(weight.sum(), 1.0)

    def propose_pos() -> tuple[int, int]:
        i, j = rng.choice(members[rng.choice(per_label.size, p=weight)], size=2, replace=False)
        return int(i), int(j)

    def propose_neg() -> tuple[int, int]:
        i, j = rng.choice(n, size=2, replace=False)
        return int(i), int(j)

    pos_pairs = draw(n_pos, total_pos, is_pos, propose_pos)
    neg_pairs = draw(n_neg, total_neg, is_neg, propose_neg)

    pairs = np.array(pos_pairs + neg_pairs, dtype=np.int64).reshape(-1, 2)  # (P, 2)
    issame = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    order = rng.permutation(pairs.shape[0])
    return pairs[order], issame[order]


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(P,)`` of each index pair ``(P, 2)`` in ``embeddings`` ``(N, D)``."""
    e = _l2n(embeddings)
    pairs = np.asarray(pairs)
    return np.einsum("pd,pd->p", e[pairs[:, 0]], e[pairs[:, 1]])


def identification_top1(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    gallery_group,
) -> dict:
    """1:N closed-set identification accuracy with a single-design gallery.

    The gallery holds one sample per identity (the first, in index order) among
    the samples of ``gallery_group``.  Every other sample whose identity is in
    the gallery is a probe; it is matched to the gallery entry of highest cosine
    similarity (ties: lowest gallery position, identities in sorted order).
    Probes of identities absent from the gallery are excluded and counted.

    Args:
        embeddings: ``(N, D)`` embeddings (need not be normalised).
        labels: ``(N,)`` identity ids.
        groups: ``(N,)`` design / photo ids.
        gallery_group: the group value whose samples form the gallery.

    Returns:
        dict with ``top1`` (NaN if there are no probes), ``n_correct``,
        ``n_probes``, ``n_gallery``, ``n_excluded_probes`` and
        ``n_missing_identities`` (identities with samples but no gallery entry).

    Longer than a screen: mostly the docstring; gallery and probe selection share one mask.
    """
    e = _l2n(embeddings)  # (N, D)
    labels = np.asarray(labels).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if not (e.shape[0] == labels.size == groups.size):
        raise ValueError("embeddings, labels and groups differ in length")
    in_gallery_group = groups == gallery_group
    if not in_gallery_group.any():
        raise ValueError(f"gallery group {gallery_group!r} has no samples")

    gallery_labels, first = np.unique(labels[in_gallery_group], return_index=True)  # (G,)
    gallery_idx = np.flatnonzero(in_gallery_group)[first]  # (G,)
    is_probe = np.ones(labels.size, bool)
    is_probe[gallery_idx] = False
    known = np.isin(labels, gallery_labels)
    excluded = is_probe & ~known
    probe_idx = np.flatnonzero(is_probe & known)  # (Q,)

    sims = e[probe_idx] @ e[gallery_idx].T  # (Q, G)
    pred = gallery_labels[np.argmax(sims, axis=1)] if probe_idx.size else gallery_labels[:0]
    n_correct = int(np.sum(pred == labels[probe_idx]))
    return {
        "top1": n_correct / probe_idx.size if probe_idx.size else float("nan"),
        "n_correct": n_correct,
        "n_probes": int(probe_idx.size),
        "n_gallery": int(gallery_idx.size),
        "n_excluded_probes": int(excluded.sum()),
        "n_missing_identities": int(np.unique(labels[excluded]).size),
    }


def topk_accuracy(class_ids: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    """Closed-set classification accuracy from ranked predictions.

    Args:
        class_ids: ``(N, K)`` predicted class ids per sample, best first (e.g. the ``class_ids`` of
            :meth:`partialfc.PartialFC.predict`).
        labels: ``(N,)`` true class ids.
        ks: the k of each top-k accuracy; a k larger than ``K`` uses all ``K`` columns (with
            ``K`` = the number of classes that is 1.0).

    Returns:
        ``{k: share of samples whose label is among the first k predictions}`` (float, NaN when N = 0).
    """
    ids = np.asarray(class_ids)
    y = np.asarray(labels).reshape(-1)
    if ids.ndim != 2 or ids.shape[0] != y.shape[0]:
        raise ValueError(f"class_ids must be (N, K) with N = len(labels) = {y.shape[0]}, got {ids.shape}")
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        hit = (ids[:, :k] == y[:, None]).any(axis=1)  # (N,)
        out[int(k)] = float(hit.mean()) if y.size else float("nan")
    return out


def embed(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = False,
) -> np.ndarray:
    """L2-normalised embeddings of ``images`` ``(N, C, H, W)`` -> ``(N, E)`` float32.

    Runs ``model`` in eval mode under ``torch.no_grad`` (restoring its previous
    mode afterwards), moving it and each batch to ``device``.  With ``flip``,
    the embedding of each image is summed with that of its horizontal mirror
    before normalisation (standard face-evaluation test-time augmentation).
    """
    x_all = torch.as_tensor(images)
    if x_all.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x_all.shape)}")
    device = torch.device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, x_all.shape[0], batch_size):
                x = x_all[start : start + batch_size].to(device, torch.float32)  # (b, C, H, W)
                e = model(x).float()  # (b, E)
                if flip:
                    e = e + model(torch.flip(x, dims=[-1])).float()
                chunks.append(torch.nn.functional.normalize(e, dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)

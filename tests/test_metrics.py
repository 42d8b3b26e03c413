"""Tests for launch.metrics against brute-force numpy / scikit-learn oracles."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from launch.metrics import (
    best_threshold,
    embed,
    identification_top1,
    make_pairs,
    pair_scores,
    verification_metrics,
)

# ----------------------------------------------------------------- oracles


def brute_best_threshold(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Try every split between sorted distinct scores; keep the first best."""
    u = sorted(set(s.tolist()))
    cands = [np.nextafter(u[0], -np.inf)] + [(a + b) / 2 for a, b in zip(u, u[1:])] + [u[-1]]
    best = (None, -1.0)
    for t in cands:
        acc = sum((si > t) == yi for si, yi in zip(s, y)) / len(s)
        if acc > best[1]:
            best = (t, acc)
    return best


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie), over all pos/neg pairs."""
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def brute_tar(s: np.ndarray, y: np.ndarray, far: float) -> float:
    """Highest TAR over thresholds 'accept iff score >= t' whose FAR <= far."""
    pos, neg = s[y], s[~y]
    best = 0.0  # t = +inf accepts nothing
    for t in np.unique(s):
        if np.mean(neg >= t) <= far:
            best = max(best, float(np.mean(pos >= t)))
    return best


# ------------------------------------------------------ verification


def test_best_threshold_hand_checked() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0, 0, 1, 0, 1, 1], bool)
    # 0.25 and 0.45 both give 5/6 correct; ties go to the smaller threshold
    thr, acc = best_threshold(s, y)
    assert thr == pytest.approx(0.25)
    assert acc == pytest.approx(5 / 6)
    # all "same": threshold below the minimum
    thr, acc = best_threshold(np.array([0.3, 0.7]), np.array([True, True]))
    assert thr < 0.3 and acc == 1.0


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.random(60) < 0.4
        s = np.round(rng.normal(size=60) + 1.0 * y, 1)  # rounding makes ties
        thr, acc = best_threshold(s, y)
        bthr, bacc = brute_best_threshold(s, y)
        assert acc == pytest.approx(bacc)
        assert thr == pytest.approx(bthr)


def test_perfectly_separable() -> None:
    rng = np.random.default_rng(0)
    neg = rng.uniform(-1.0, 0.2, 300)
    pos = rng.uniform(0.4, 1.0, 300)
    s = np.concatenate([pos, neg])
    y = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    r = verification_metrics(s, y)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["auc"] == 1.0
    assert neg.max() < r["best_threshold"] < pos.min()
    assert len(r["fold_accuracies"]) == 10
    # 300 negatives cannot resolve FAR 1e-3 -> NaN + note, not a made-up number
    assert math.isnan(r["tar@far=1e-3"]) and math.isnan(r["tar@far=1e-4"])
    assert any("tar@far=1e-3" in n for n in r["notes"])


def test_random_scores_are_chance() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=4000)
    y = rng.random(4000) < 0.5
    r = verification_metrics(s, y)
    assert abs(r["auc"] - 0.5) < 0.04
    assert abs(r["accuracy"] - 0.5) < 0.05


def test_auc_and_kfold_accuracy_match_oracles() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.5
    s = np.round(rng.normal(size=400) + 1.2 * y, 2)
    r = verification_metrics(s, y, n_folds=5, seed=7)
    assert r["auc"] == pytest.approx(brute_auc(s, y), abs=1e-12)
    # oracle: same documented split (sklearn), brute-force threshold per fold
    accs = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=7).split(s, y):
        thr, _ = brute_best_threshold(s[train], y[train])
        accs.append(np.mean((s[test] > thr) == y[test]))
    assert r["fold_accuracies"] == pytest.approx(accs)
    assert r["accuracy"] == pytest.approx(np.mean(accs))
    assert r["accuracy_std"] == pytest.approx(np.std(accs))


def test_tar_at_far_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(500, bool), np.zeros(2000, bool)]
    s = np.round(rng.normal(size=y.size) + 2.0 * y, 2)  # ties on purpose
    r = verification_metrics(s, y)
    assert r["tar@far=1e-3"] == pytest.approx(brute_tar(s, y, 1e-3))
    assert 0.0 < r["tar@far=1e-3"] < 1.0
    assert math.isnan(r["tar@far=1e-4"])  # 2000 negatives < 1e4
    assert r["n_pos"] == 500 and r["n_neg"] == 2000


def test_tar_at_far_hand_checked() -> None:
    neg = np.arange(1000) / 1000.0  # 0.000 ... 0.999
    pos = np.array([1.5, 1.2, 0.9995, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0])
    s = np.r_[pos, neg]
    y = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    r = verification_metrics(s, y, fars=(1e-3, 2e-3))
    # FAR <= 1e-3 allows one accepted negative (0.999): pos 1.5, 1.2, 0.9995 pass
    assert r["tar@far=1e-3"] == pytest.approx(0.3)
    assert r["tar@far=2e-3"] == pytest.approx(0.3)


def test_single_class_and_bad_input() -> None:
    r = verification_metrics(np.linspace(0, 1, 20), np.ones(20, bool))
    assert math.isnan(r["auc"]) and r["notes"]
    with pytest.raises(ValueError):
        verification_metrics(np.zeros(5), np.zeros(4, bool))
    with pytest.raises(ValueError):
        verification_metrics(np.array([0.1, np.nan] * 10), np.r_[np.ones(10), np.zeros(10)])


# ------------------------------------------------------------- pairs


def _toy_labels() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(12), 6)  # 12 identities x 6 designs
    groups = np.tile(np.arange(6), 12)
    return labels, groups


def test_make_pairs_validity() -> None:
    labels, groups = _toy_labels()
    pairs, issame = make_pairs(labels, groups, n_pairs=301, seed=0)
    assert pairs.shape == (301, 2) and issame.shape == (301,)
    assert issame.sum() == 150
    i, j = pairs[:, 0], pairs[:, 1]
    assert np.all(i != j)
    assert np.array_equal(labels[i] == labels[j], issame)
    assert np.all(groups[i][issame] != groups[j][issame])
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 301  # no repeats
    again, _ = make_pairs(labels, groups, n_pairs=301, seed=0)
    other, _ = make_pairs(labels, groups, n_pairs=301, seed=1)
    assert np.array_equal(pairs, again) and not np.array_equal(pairs, other)


def test_make_pairs_exhaustive_and_too_many() -> None:
    labels, groups = _toy_labels()
    all_pos = {
        (a, b)
        for a, b in combinations(range(labels.size), 2)
        if labels[a] == labels[b] and groups[a] != groups[b]
    }
    assert len(all_pos) == 12 * 15
    pairs, issame = make_pairs(labels, groups, n_pairs=2 * len(all_pos), seed=0)
    assert {tuple(sorted(p)) for p in pairs[issame].tolist()} == all_pos
    with pytest.raises(ValueError, match="positive"):
        make_pairs(labels, groups, n_pairs=2 * len(all_pos) + 2, seed=0)


def test_make_pairs_positives_uniform() -> None:
    # identity 0: 2 samples in 2 groups (1 valid pair); identity 1: 6 samples,
    # 5 in one group (5 valid cross-group pairs out of 15); identity 2: 3
    # samples in one group (none valid).  Each of the 6 valid pairs should be
    # drawn equally often, whatever identity it belongs to.
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2])
    groups = np.array([0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    counts: dict[tuple[int, int], int] = {}
    for seed in range(600):
        pairs, issame = make_pairs(labels, groups, n_pairs=2, seed=seed)
        key = tuple(sorted(pairs[issame][0].tolist()))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    assert all(55 < c < 145 for c in counts.values()), counts  # expected 100 each


def test_pair_scores_cosine() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(10, 4))
    pairs = np.array([[0, 1], [2, 3], [4, 4]])
    expected = [e[a] @ e[b] / np.linalg.norm(e[a]) / np.linalg.norm(e[b]) for a, b in pairs]
    np.testing.assert_allclose(pair_scores(e, pairs), expected, rtol=1e-12)


# ---------------------------------------------------- identification


def brute_identification(e, labels, groups, gallery_group):
    gallery = {}
    for idx in range(len(labels)):
        if groups[idx] == gallery_group and labels[idx] not in gallery:
            gallery[labels[idx]] = idx
    correct = probes = excluded = 0
    for idx in range(len(labels)):
        if idx in gallery.values():
            continue
        if labels[idx] not in gallery:
            excluded += 1
            continue
        probes += 1
        best_label, best = None, -np.inf
        for lab in sorted(gallery):
            g = gallery[lab]
            c = e[idx] @ e[g] / (np.linalg.norm(e[idx]) * np.linalg.norm(e[g]))
            if c > best:
                best_label, best = lab, c
        correct += best_label == labels[idx]
    return correct, probes, excluded


def test_identification_hand_checked() -> None:
    # 2-D embeddings; gallery design "A" has identities 0 and 1; identity 2 is
    # only in design "B" so its probe is excluded.
    e = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [1, 1.1]], float)
    labels = np.array([0, 1, 0, 1, 1, 2])
    groups = np.array(["A", "A", "B", "B", "C", "B"])
    r = identification_top1(e, labels, groups, "A")
    # probes: 2 -> id0 (right), 3 -> id1 (right), 4 -> id0 (wrong, truth id1)
    assert r["n_gallery"] == 2 and r["n_probes"] == 3
    assert r["n_correct"] == 2 and r["top1"] == pytest.approx(2 / 3)
    assert r["n_excluded_probes"] == 1 and r["n_missing_identities"] == 1
    with pytest.raises(ValueError):
        identification_top1(e, labels, groups, "Z")


def test_identification_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(15, 8))
    labels = np.repeat(np.arange(15), 5)
    groups = np.tile(np.arange(5), 15)
    keep = ~((labels >= 12) & (groups == 0))  # ids 12-14 missing from gallery group 0
    labels, groups = labels[keep], groups[keep]
    e = centres[labels] + 0.9 * rng.normal(size=(labels.size, 8))
    r = identification_top1(e, labels, groups, 0)
    correct, probes, excluded = brute_identification(e, labels, groups, 0)
    assert (r["n_correct"], r["n_probes"], r["n_excluded_probes"]) == (correct, probes, excluded)
    assert r["n_missing_identities"] == 3 and r["n_gallery"] == 12
    assert 0.0 < r["top1"] < 1.0


# -------------------------------------------------------------- embed


class _Asym(nn.Module):
    """Linear map of the flattened image (not mirror-symmetric), with BN + dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2 * 4 * 4, 6)
        self.drop = nn.Dropout(0.5)  # active only in train mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x.flatten(1)))


def test_embed_normalised_and_flip() -> None:
    torch.manual_seed(0)
    model = _Asym().train()
    x = np.random.default_rng(0).normal(size=(7, 2, 4, 4)).astype(np.float32)
    w = model.lin.weight.detach().double().numpy()
    b = model.lin.bias.detach().double().numpy()
    f = lambda a: a.reshape(len(a), -1) @ w.T + b  # noqa: E731 - numpy oracle
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731

    out = embed(model, x, batch_size=3, device="cpu")
    assert out.shape == (7, 6) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out, unit(f(x)), rtol=1e-4, atol=1e-5)  # eval mode: no dropout

    out_flip = embed(model, torch.from_numpy(x), batch_size=4, device="cpu", flip=True)
    np.testing.assert_allclose(out_flip, unit(f(x) + f(x[..., ::-1])), rtol=1e-4, atol=1e-5)
    assert not np.allclose(out_flip, out)

    assert model.training  # mode restored
    assert model.lin.weight.grad is None  # no autograd

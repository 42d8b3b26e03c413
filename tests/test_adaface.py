"""AdaFace as a margin of the sharded head, against a float64 oracle written from the paper's formulas
(not from the head's code): loss, exact gradients and running statistics over two steps, on 1-4 gloo
ranks with uneven and empty batches; sampled and chunked paths; statistics once per forward."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from partialfc import AdaFace, PartialFC
from tests.row_margin_harness import Setup, check_against_oracle, check_sampled, run, sub_center_weight

D, C = 8, 13
KW = dict(s=16.0, m=0.4, h=0.333, t_alpha=0.3)  # a large t_alpha makes the statistics move visibly


def oracle(x, weight, labels, valid, mean, std, s, m, h, t_alpha, eps=1e-3, training=True, sub_centers=1):
    """float64 loss and the statistics after the update; gradients by autograd through the formulas.
    ``sub_centers`` k: ``weight`` has k rows per class, a class's cosine is its rows' max."""
    n = x.detach().norm(dim=1).clamp(0.001, 100)
    if training and bool(valid.any()):
        mean = t_alpha * n[valid].mean() + (1 - t_alpha) * mean
        if int(valid.sum()) > 1:
            std = t_alpha * n[valid].std() + (1 - t_alpha) * std
    z = (h * (n - mean) / (std + eps)).clamp(-1, 1)
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # (B, C k)
    cos = cos.view(cos.shape[0], -1, sub_centers).max(dim=2).values  # (B, C)
    y = labels.clamp_min(0)
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    theta = torch.acos(cos_y.clamp(-1 + eps, 1 - eps))
    target = torch.cos((theta - m * z).clamp(eps, math.pi - eps)) - (m + m * z)
    logits = s * torch.where(F.one_hot(y, cos.shape[1]).bool(), target[:, None], cos)
    loss = F.cross_entropy(logits[valid], labels[valid], reduction="sum") / max(int(valid.sum()), 1)
    return loss, float(mean), float(std)


def _global_batch(step, sizes):
    g = torch.Generator().manual_seed(1000 + step)
    xs = [torch.randn(b, D, generator=g, dtype=torch.float64) * (1 + 4 * torch.rand(b, 1, generator=g,
                                                                                      dtype=torch.float64))
          for b in sizes]
    ys = [torch.randint(0, C, (b,), generator=g) for b in sizes]
    if sizes[0] > 1:
        ys[0][1] = -100  # an ignored row
    return xs, ys


SETUP = Setup(D, C, margin=partial(AdaFace, **KW), batch=_global_batch)
INITIAL = {"batch_mean": 20.0, "batch_std": 100.0}  # the paper's initial running statistics


def _oracle(x, weight, labels, valid, state):
    """:func:`oracle` in the harness's calling convention (see tests/row_margin_harness.py)."""
    loss, mean, std = oracle(x, weight, labels, valid, state["batch_mean"], state["batch_std"], **KW)
    return loss, {"batch_mean": mean, "batch_std": std}


def _check(sizes_per_step, head_kw=None):
    results = run(SETUP, sizes_per_step, head_kw)
    check_against_oracle(SETUP, results, sizes_per_step, _oracle, INITIAL, state_tol=dict(rel=1e-12))


SUB = 3
SETUP_SUB = Setup(D, C, margin=partial(AdaFace, **KW), batch=_global_batch, head_kw={"sub_centers": SUB},
                  full_weight=partial(sub_center_weight, SUB))


def _oracle_sub(x, weight, labels, valid, state):
    loss, mean, std = oracle(x, weight, labels, valid, state["batch_mean"], state["batch_std"], **KW,
                             sub_centers=SUB)
    return loss, {"batch_mean": mean, "batch_std": std}


@pytest.mark.parametrize("sizes,head_kw", [([[6], [5]], {}), ([[4, 0, 3], [2, 5, 1]], {"chunk_size": 2})])
def test_sub_centers_match_the_oracle(sizes, head_kw):
    """AdaFace on sub-center heads: the margin on each class's nearest row, statistics as before."""
    results = run(SETUP_SUB, sizes, head_kw)
    check_against_oracle(SETUP_SUB, results, sizes, _oracle_sub, INITIAL, state_tol=dict(rel=1e-12))


def test_single_rank_two_steps_match_the_oracle():
    _check([[7], [5]])


def test_chunked_single_rank_matches_the_oracle():
    _check([[6], [9]], {"chunk_size": 4})


@pytest.mark.parametrize("world,sizes", [(2, [[4, 0], [3, 5]]), (4, [[2, 3, 0, 1], [1, 0, 4, 2]])])
def test_sharded_two_steps_match_the_oracle(world, sizes):
    """Uneven batches, an empty rank, statistics over the global batch (identical on every rank)."""
    assert all(len(s) == world for s in sizes)
    _check(sizes)


def test_sampled_matches_the_oracle_on_the_sampled_classes():
    """Sampling: the loss is AdaFace over the union of every rank's sampled classes (positives
    always among them)."""
    sizes = [[5, 3]]
    check_sampled(SETUP, run(SETUP, sizes, {"sample_rate": 0.5}), sizes[0], _oracle, INITIAL)


def test_statistics_advance_once_per_training_forward():
    """Eval mode leaves them; torch.utils.checkpoint's recomputation does not advance them again;
    with accumulation every micro-batch's forward counts."""
    from torch.utils.checkpoint import checkpoint
    head = PartialFC(D, C, margin=AdaFace(**KW), dtype=torch.float64)
    xs, ys = _global_batch(0, [6])
    x = xs[0].requires_grad_(True)
    head.eval()
    head(x, ys[0])
    assert head.margin.batch_mean.item() == 20.0
    head.train()
    for reentrant in (False, True):
        before = head.margin.batch_mean.item()
        checkpoint(head, x, ys[0], use_reentrant=reentrant).backward()
        n = x.detach().norm(dim=1).clamp(0.001, 100)[ys[0] != -100]
        assert head.margin.batch_mean.item() == pytest.approx(0.3 * n.mean().item() + 0.7 * before, rel=1e-12)
    before = head.margin.batch_mean.item()
    head(x, ys[0]).backward()
    head(x, ys[0]).backward()  # a second micro-batch
    assert head.margin.batch_mean.item() != before
    state = head.state_dict()
    assert {"margin.batch_mean", "margin.batch_std"} <= set(state)
    fresh = PartialFC(D, C, margin=AdaFace(**KW), dtype=torch.float64)
    fresh.load_state_dict(state)
    assert fresh.margin.batch_mean.item() == head.margin.batch_mean.item()


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="AdaFace"):
        AdaFace(s=-1.0)
    with pytest.raises(ValueError, match="t_alpha"):
        AdaFace(t_alpha=2.0)

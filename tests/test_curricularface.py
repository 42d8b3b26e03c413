"""CurricularFace as a margin of the sharded head, against a float64 oracle written from the paper's
formulas (not from the head's code): loss, exact gradients and the running t over two steps, on 1-3
gloo ranks with uneven and empty batches; chunked and sampled paths; t once per forward."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from partialfc import CurricularFace, PartialFC
from tests.row_margin_harness import Setup, check_against_oracle, check_sampled, run, sub_center_weight

D, C = 6, 11
KW = dict(s=8.0, m=0.5, t_alpha=0.4)  # a large t_alpha makes t move visibly


def oracle(x, weight, labels, valid, t, s, m, t_alpha, training=True, sub_centers=1):
    """float64 loss and t after the update; gradients by autograd through the formulas.
    ``sub_centers`` k: ``weight`` has k rows per class, a class's cosine is its rows' max."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # (B, C k)
    cos = cos.view(cos.shape[0], -1, sub_centers).max(dim=2).values  # (B, C)
    y = labels.clamp_min(0)
    onehot = F.one_hot(y, cos.shape[1]).bool()
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    if training and bool(valid.any()):
        t = t_alpha * cos_y.detach()[valid].mean() + (1 - t_alpha) * t
    theta = torch.acos(cos_y)
    target = torch.where(cos_y > math.cos(math.pi - m), torch.cos(theta + m), cos_y - m * math.sin(m))
    thr = torch.cos(theta.detach() + m)  # a comparison: no gradient
    hard = (cos.detach() > thr[:, None]) & ~onehot
    logits = s * torch.where(onehot, target[:, None], torch.where(hard, cos * (t + cos), cos))
    loss = F.cross_entropy(logits[valid], labels[valid], reduction="sum") / max(int(valid.sum()), 1)
    return loss, float(t)


def _global_batch(step, sizes):
    g = torch.Generator().manual_seed(500 + step)
    xs = [torch.randn(b, D, generator=g, dtype=torch.float64) for b in sizes]
    ys = [torch.randint(0, C, (b,), generator=g) for b in sizes]
    if sizes[0] > 1:
        ys[0][1] = -100
    return xs, ys


SETUP = Setup(D, C, margin=partial(CurricularFace, **KW), batch=_global_batch)
INITIAL = {"t": 0.0}  # the paper's initial t


def _oracle(x, weight, labels, valid, state):
    """:func:`oracle` in the harness's calling convention (see tests/row_margin_harness.py)."""
    loss, t = oracle(x, weight, labels, valid, state["t"], **KW)
    return loss, {"t": t}


def _check(sizes_per_step, head_kw=None):
    results = run(SETUP, sizes_per_step, head_kw)
    check_against_oracle(SETUP, results, sizes_per_step, _oracle, INITIAL, state_tol=dict(rel=1e-12, abs=1e-15))


SUB = 3
SETUP_SUB = Setup(D, C, margin=partial(CurricularFace, **KW), batch=_global_batch, head_kw={"sub_centers": SUB},
                  full_weight=partial(sub_center_weight, SUB))


def _oracle_sub(x, weight, labels, valid, state):
    loss, t = oracle(x, weight, labels, valid, state["t"], **KW, sub_centers=SUB)
    return loss, {"t": t}


@pytest.mark.parametrize("sizes,head_kw", [([[6], [5]], {"chunk_size": 4}), ([[4, 0], [2, 5]], {})])
def test_sub_centers_match_the_oracle(sizes, head_kw):
    """CurricularFace on sub-center heads: target and hard negatives from each class's nearest row."""
    results = run(SETUP_SUB, sizes, head_kw)
    check_against_oracle(SETUP_SUB, results, sizes, _oracle_sub, INITIAL, state_tol=dict(rel=1e-12, abs=1e-15))


@pytest.mark.parametrize("head_kw", [{}, {"chunk_size": 4}])
def test_single_rank_two_steps_match_the_oracle(head_kw):
    _check([[9], [7]], head_kw)


@pytest.mark.parametrize("world,sizes,head_kw", [(2, [[5, 0], [3, 4]], {}),
                                                 (3, [[2, 4, 0], [0, 3, 3]], {"chunk_size": 2})])
def test_sharded_two_steps_match_the_oracle(world, sizes, head_kw):
    assert all(len(s) == world for s in sizes)
    _check(sizes, head_kw)


def test_sampled_matches_the_oracle_on_the_sampled_classes():
    sizes = [[6, 4]]
    check_sampled(SETUP, run(SETUP, sizes, {"sample_rate": 0.5}), sizes[0], _oracle, INITIAL)


def test_t_advances_once_per_training_forward():
    from torch.utils.checkpoint import checkpoint
    head = PartialFC(D, C, margin=CurricularFace(**KW), dtype=torch.float64)
    xs, ys = _global_batch(0, [8])
    x = xs[0].requires_grad_(True)
    head.eval()
    head(x, ys[0])
    assert head.margin.t.item() == 0.0
    head.train()
    checkpoint(head, x, ys[0], use_reentrant=False).backward()
    once = head.margin.t.item()
    _, expected = oracle(x.detach(), head.weight.detach(), ys[0], ys[0] != -100, 0.0, **KW)
    assert once == pytest.approx(expected, rel=1e-12)
    assert "margin.t" in head.state_dict()


def test_t_update_reads_nothing_back_and_skips_a_batch_without_valid_rows():
    """t follows t_alpha * mean(cos_y over valid rows) + (1 - t_alpha) * t with no host read (so it
    also traces under FakeTensorMode); a batch whose rows are all ignored leaves t unchanged."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from partialfc import CurricularFace
    mod = CurricularFace(s=64.0, m=0.5, t_alpha=0.1)
    rows = mod.for_batch(None, None)
    cos_y = torch.tensor([0.2, 0.4, 0.9], dtype=torch.float64)
    rows.negatives(cos_y, torch.tensor([True, True, False]))
    assert mod.t.item() == pytest.approx(0.1 * 0.3)
    rows.negatives(cos_y, torch.zeros(3, dtype=torch.bool))
    assert mod.t.item() == pytest.approx(0.1 * 0.3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_t = CurricularFace(s=64.0, m=0.5)
        fake_t.for_batch(None, None).negatives(torch.zeros(4), torch.ones(4, dtype=torch.bool))

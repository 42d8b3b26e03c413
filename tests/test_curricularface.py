"""CurricularFace as a margin of the sharded head, against a float64 oracle written from the paper's
formulas (not from the head's code): loss, exact gradients and the running t over two steps, on 1-3
gloo ranks with uneven and empty batches; chunked and sampled paths; t once per forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc import CurricularFace, PartialFC, init_weight_rows_
from tests.dist_utils import run_distributed

D, C = 6, 11
KW = dict(s=8.0, m=0.5, t_alpha=0.4)  # a large t_alpha makes t move visibly


def oracle(x, weight, labels, valid, t, s, m, t_alpha, training=True):
    """float64 loss and t after the update; gradients by autograd through the formulas."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # (B, C)
    y = labels.clamp_min(0)
    onehot = F.one_hot(y, weight.shape[0]).bool()
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


def _run_head(rank, world, sizes_per_step, head_kw):
    head = PartialFC(D, C, margin=CurricularFace(**KW), dtype=torch.float64, **head_kw)
    out = []
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = _global_batch(step, sizes)
        x = xs[rank].clone().requires_grad_(True)
        loss = head(x, ys[rank])
        loss.backward()
        out.append({"loss": loss.item(), "x_grad": x.grad.clone(), "w_grad": head.weight.grad.clone(),
                    "t": head.margin.t.item(), "bounds": (head.class_start, head.class_end),
                    "sampled": None if head.sampled_index is None else head.sampled_index.clone()})
        head.weight.grad = None
    return out


def _check(results, sizes_per_step, world):
    full = init_weight_rows_(torch.empty(C, D, dtype=torch.float64), 0, 0)
    t = 0.0
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = _global_batch(step, sizes)
        x = torch.cat(xs).requires_grad_(True)
        w = full.clone().requires_grad_(True)
        labels = torch.cat(ys)
        loss, t = oracle(x, w, labels, labels != -100, t, **KW)
        loss.backward()
        offset = 0
        for rank in range(world):
            r = results[rank][step]
            lo, hi = r["bounds"]
            assert r["loss"] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
            assert r["t"] == pytest.approx(t, rel=1e-12, abs=1e-15)
            torch.testing.assert_close(r["w_grad"], w.grad[lo:hi], rtol=1e-8, atol=1e-11)
            b = sizes[rank]
            torch.testing.assert_close(r["x_grad"], world * x.grad[offset: offset + b], rtol=1e-8, atol=1e-11)
            offset += b


@pytest.mark.parametrize("head_kw", [{}, {"chunk_size": 4}])
def test_single_rank_two_steps_match_the_oracle(head_kw):
    sizes = [[9], [7]]
    _check([_run_head(0, 1, sizes, head_kw)], sizes, 1)


@pytest.mark.parametrize("world,sizes,head_kw", [(2, [[5, 0], [3, 4]], {}),
                                                 (3, [[2, 4, 0], [0, 3, 3]], {"chunk_size": 2})])
def test_sharded_two_steps_match_the_oracle(world, sizes, head_kw):
    _check(run_distributed(_run_head, world, sizes, head_kw), sizes, world)


def _sampled(rank, world):
    return _run_head(rank, world, [[6, 4]], {"sample_rate": 0.5})


def test_sampled_matches_the_oracle_on_the_sampled_classes():
    sizes = [6, 4]
    results = run_distributed(_sampled, 2)
    kept = torch.cat([r[0]["sampled"] + r[0]["bounds"][0] for r in results])
    full = init_weight_rows_(torch.empty(C, D, dtype=torch.float64), 0, 0)
    xs, ys = _global_batch(0, sizes)
    labels = torch.cat(ys)
    remap = torch.full((C,), -1, dtype=torch.int64)
    remap[kept] = torch.arange(kept.numel())
    sub = torch.where(labels == -100, labels, remap[labels.clamp_min(0)])
    loss, _ = oracle(torch.cat(xs), full[kept], sub, labels != -100, 0.0, **KW)
    assert results[0][0]["loss"] == pytest.approx(loss.item(), rel=1e-10)


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

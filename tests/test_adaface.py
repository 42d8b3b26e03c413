"""AdaFace as a margin of the sharded head, against a float64 oracle written from the paper's formulas
(not from the head's code): loss, exact gradients and running statistics over two steps, on 1-4 gloo
ranks with uneven and empty batches; sampled and chunked paths; statistics once per forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc import AdaFace, PartialFC, init_weight_rows_
from tests.dist_utils import run_distributed

D, C = 8, 13
KW = dict(s=16.0, m=0.4, h=0.333, t_alpha=0.3)  # a large t_alpha makes the statistics move visibly


def oracle(x, weight, labels, valid, mean, std, s, m, h, t_alpha, eps=1e-3, training=True):
    """float64 loss and the statistics after the update; gradients by autograd through the formulas."""
    n = x.detach().norm(dim=1).clamp(0.001, 100)
    if training and bool(valid.any()):
        mean = t_alpha * n[valid].mean() + (1 - t_alpha) * mean
        if int(valid.sum()) > 1:
            std = t_alpha * n[valid].std() + (1 - t_alpha) * std
    z = (h * (n - mean) / (std + eps)).clamp(-1, 1)
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # (B, C)
    y = labels.clamp_min(0)
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    theta = torch.acos(cos_y.clamp(-1 + eps, 1 - eps))
    target = torch.cos((theta - m * z).clamp(eps, math.pi - eps)) - (m + m * z)
    logits = s * torch.where(F.one_hot(y, weight.shape[0]).bool(), target[:, None], cos)
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


def _run_head(rank, world, sizes_per_step, head_kw):
    head = PartialFC(D, C, margin=AdaFace(**KW), dtype=torch.float64, **head_kw)
    out = []
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = _global_batch(step, sizes)
        x = xs[rank].clone().requires_grad_(True)
        loss = head(x, ys[rank])
        loss.backward()
        out.append({"loss": loss.item(), "x_grad": x.grad.clone(), "w_grad": head.weight.grad.clone(),
                    "mean": head.margin.batch_mean.item(), "std": head.margin.batch_std.item(),
                    "bounds": (head.class_start, head.class_end),
                    "sampled": None if head.sampled_index is None else head.sampled_index.clone()})
        head.weight.grad = None
    return out


def _check(results, sizes_per_step, world):
    full = init_weight_rows_(torch.empty(C, D, dtype=torch.float64), 0, 0)
    mean, std = 20.0, 100.0
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = _global_batch(step, sizes)
        x = torch.cat(xs).requires_grad_(True)
        w = full.clone().requires_grad_(True)
        labels = torch.cat(ys)
        loss, mean, std = oracle(x, w, labels, labels != -100, mean, std, **KW)
        loss.backward()
        offset = 0
        for rank in range(world):
            r = results[rank][step]
            lo, hi = r["bounds"]
            assert r["loss"] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
            assert r["mean"] == pytest.approx(mean, rel=1e-12) and r["std"] == pytest.approx(std, rel=1e-12)
            torch.testing.assert_close(r["w_grad"], w.grad[lo:hi], rtol=1e-8, atol=1e-11)
            b = sizes[rank]
            torch.testing.assert_close(r["x_grad"], world * x.grad[offset: offset + b], rtol=1e-8, atol=1e-11)
            offset += b


def test_single_rank_two_steps_match_the_oracle():
    sizes = [[7], [5]]
    _check([_run_head(0, 1, sizes, {})], sizes, 1)


def test_chunked_single_rank_matches_the_oracle():
    sizes = [[6], [9]]
    _check([_run_head(0, 1, sizes, {"chunk_size": 4})], sizes, 1)


@pytest.mark.parametrize("world,sizes", [(2, [[4, 0], [3, 5]]), (4, [[2, 3, 0, 1], [1, 0, 4, 2]])])
def test_sharded_two_steps_match_the_oracle(world, sizes):
    """Uneven batches, an empty rank, statistics over the global batch (identical on every rank)."""
    _check(run_distributed(_run_head, world, sizes, {}), sizes, world)


def _sampled(rank, world):
    out = _run_head(rank, world, [[5, 3]], {"sample_rate": 0.5})
    return out


def test_sampled_matches_the_oracle_on_the_sampled_classes():
    """Sampling: the loss is AdaFace over the union of every rank's sampled classes."""
    sizes = [5, 3]
    results = run_distributed(_sampled, 2)
    kept = torch.cat([r[0]["sampled"] + r[0]["bounds"][0] for r in results])
    full = init_weight_rows_(torch.empty(C, D, dtype=torch.float64), 0, 0)
    xs, ys = _global_batch(0, sizes)
    labels = torch.cat(ys)
    remap = torch.full((C,), -1, dtype=torch.int64)
    remap[kept] = torch.arange(kept.numel())
    sub_labels = torch.where(labels == -100, labels, remap[labels.clamp_min(0)])
    assert bool((sub_labels[labels != -100] >= 0).all())  # positives are always sampled
    loss, _, _ = oracle(torch.cat(xs), full[kept], sub_labels, labels != -100, 20.0, 100.0, **KW)
    assert results[0][0]["loss"] == pytest.approx(loss.item(), rel=1e-10)


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

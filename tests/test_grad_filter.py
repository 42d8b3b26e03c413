"""Certified gradient filtering (``PartialFC(grad_filter=eps)``): the reported bound really bounds the
dropped gradient (gloo worlds 1-3, random and peaked logits, against the float64 oracle or the
unfiltered head), eps=0 is the exact head bit for bit, and SparseSGD leaves skipped rows alone."""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc import CombinedMargin, CurricularFace, PartialFC, SparseSGD, shard_bounds
from tests.dist_utils import run_distributed
from tests.oracle import reference_grads

S, M = 64.0, 0.5
D = 96
# name, head options, logits ("random" | "peaked"), eps (True: the default)
CASES = [
    ("materialized", {}, "random", 1e-2),
    ("materialized_peaked", {}, "peaked", 1e-7),
    ("chunked", dict(chunk_size=37), "random", 1e-2),
    ("chunked_peaked", dict(chunk_size=37), "peaked", 1e-9),
    ("subcenter", dict(sub_centers=3), "random", 1e-2),
    ("subcenter_chunked_peaked", dict(sub_centers=2, chunk_size=50), "peaked", 1e-7),
    ("sampled", dict(sample_rate=0.5), "random", 1e-2),
    ("sampled_sparse_peaked", dict(sample_rate=0.5, sparse_grad=True), "peaked", 1e-7),
    ("curricularface", dict(margin="curricular"), "random", 1e-2),
    ("curricularface_chunked", dict(margin="curricular", chunk_size=40), "random", 1e-2),
]
ORACLE = ("materialized", "chunked", "subcenter")  # options the float64 oracle computes directly


def _problem(seed, sizes, num_classes, k, peaked):
    """Global float64 inputs; peaked: each embedding 10-30 degrees from a row of its class (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    w = torch.randn(num_classes * k, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (total,), generator=g)
    if peaked:
        w_y = F.normalize(w[y * k + torch.randint(0, k, (total,), generator=g)], dim=1)
        u = torch.randn(total, D, generator=g, dtype=torch.float64)
        u = F.normalize(u - (u * w_y).sum(1, keepdim=True) * w_y, dim=1)
        theta = torch.deg2rad(10 + 20 * torch.rand(total, generator=g, dtype=torch.float64)).unsqueeze(1)
        x = (torch.cos(theta) * w_y + torch.sin(theta) * u) * (0.5 + 3 * torch.rand(total, 1, generator=g))
    else:
        x = torch.randn(total, D, generator=g, dtype=torch.float64) * 2
    if total > 3:
        y[2] = -100
    return x, y, w


def _head(world_opts, eps, num_classes):
    opts = dict(world_opts)
    margin = CurricularFace(s=S, m=M) if opts.pop("margin", None) == "curricular" else CombinedMargin.arcface(s=S, m=M)
    return PartialFC(D, num_classes, margin=margin, grad_filter=eps, grad_filter_block=8, **opts).double()


def _run(head, w_local, x_local, y_local, stats):
    with torch.no_grad():
        head.weight.copy_(w_local)
    x = x_local.clone().requires_grad_()
    if stats:
        loss, _ = head(x, y_local, return_stats=True)
    else:
        loss = head(x, y_local)
    loss.backward()
    grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    return x.grad, grad_w


def _bound_holds(rank, world, sizes, num_classes, cases):
    """Every rank checks its shard's weight gradient and its embeddings' gradient against the bound."""
    import torch.distributed as dist
    distributed = world > 1
    out = {}
    for step, (name, opts, logits, eps) in enumerate(cases):
        k = opts.get("sub_centers", 1)
        x_all, y_all, w_all = _problem(1000 + step, sizes, num_classes, k, logits == "peaked")
        start, end = shard_bounds(num_classes, world, rank)
        lo = sum(sizes[:rank])
        x_loc, y_loc, w_loc = x_all[lo: lo + sizes[rank]], y_all[lo: lo + sizes[rank]], w_all[start * k: end * k]
        head = _head(opts, eps, num_classes)
        gx, gw = _run(head, w_loc, x_loc, y_loc, stats=True)
        fs = head.last_filter_stats
        assert fs.ready and fs.blocks > 0
        bounds = fs.global_bounds()
        if name in ORACLE:  # the exact float64 gradient, from the formulas
            _, ref_gx, ref_gw = reference_grads(x_all, w_all, y_all, s=S, m2=M, sub_centers=k)
            ref_gx, ref_gw = world * ref_gx[lo: lo + sizes[rank]], ref_gw[start * k: end * k]
        else:  # the exact head of the same objective (same sample, same CurricularFace t)
            ref_gx, ref_gw = _run(_head(opts, None, num_classes), w_loc, x_loc, y_loc, stats=False)
        # the float64 arithmetic's own error (far below what a test of the bound could confuse with it)
        tol_w = 1e-10 * float(ref_gw.norm()) + 1e-14
        tol_x = 1e-10 * float(ref_gx.norm()) + 1e-14
        err_w, err_x = float((gw - ref_gw).norm()), (gx - ref_gx).norm(dim=1)
        assert err_w <= float(fs.weight_bound) + tol_w, (name, rank, err_w, float(fs.weight_bound))
        row_bound = head.embedding_grad_scale * bounds.row_bound[lo: lo + sizes[rank]]
        assert bool((err_x <= row_bound + tol_x).all()), (name, rank, err_x, row_bound)
        assert float(err_x.norm()) <= float(bounds.embedding_bound) + tol_x, name
        sq = torch.tensor([err_w ** 2, float(err_x.norm()) ** 2], dtype=torch.float64)
        if distributed:
            dist.all_reduce(sq)
        assert math.sqrt(sq[0]) <= float(bounds.weight_bound) + tol_w * world, name
        out[name] = (bounds.skipped_fraction, math.sqrt(sq[0]), float(bounds.weight_bound), math.sqrt(sq[1]))
    return out


@pytest.mark.parametrize("world,sizes", [(1, [13]), (2, [6, 11]), (3, [7, 0, 9])])
def test_reported_bound_bounds_the_dropped_gradient(world, sizes):
    results = run_distributed(_bound_holds, world, sizes, 331, CASES)
    for name, (skipped, err_w, bound_w, err_x) in results[0].items():
        assert 0 < skipped <= 1, (name, skipped)  # something was skipped: the test bites
        if "peaked" not in name:
            assert skipped < 1, name
            # random logits drop a visible gradient: the bound is tested far above the float64 noise, and
            # is not vacuous
            assert err_w > 1e-6 and bound_w < 50 * err_w, (name, err_w, bound_w)


OPTIONS = [{}, dict(chunk_size=7), dict(sample_rate=0.5), dict(sample_rate=0.5, sparse_grad=True),
           dict(sparse_grad=True), dict(sub_centers=3), dict(sub_centers=2, chunk_size=9),
           dict(margin="curricular"), dict(margin="curricular", chunk_size=11, sub_centers=2)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_eps_zero_is_the_exact_head_bit_for_bit(opts):
    """float32, where any change of summation order would show: eps=0 skips nothing and runs the
    same products as the unfiltered head."""
    torch.manual_seed(3)
    n, b = 120, 10
    x = torch.randn(b, D) * 3
    y = torch.randint(0, n, (b,))
    grads = []
    for eps in (None, 0.0):
        o = dict(opts)
        margin = CurricularFace(s=S, m=M) if o.pop("margin", None) == "curricular" else CombinedMargin.arcface(s=S, m=M)
        head = PartialFC(D, n, margin=margin, grad_filter=eps, grad_filter_block=8, seed=1, **o)
        xx = x.clone().requires_grad_()
        loss, _ = head(xx, y, return_stats=True)
        loss.backward()
        grads.append((loss.detach(), xx.grad, head.weight.grad.to_dense() if head.weight.grad.is_sparse
                      else head.weight.grad))
        if eps == 0.0:
            assert head.last_filter_stats.skipped_blocks == 0 and float(head.last_filter_stats.weight_bound) == 0
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def _peaked_head(sample_rate=1.0, eps=1e-4):
    torch.manual_seed(5)
    n, b = 400, 12
    head = PartialFC(D, n, margin=CombinedMargin.arcface(s=S, m=M), sample_rate=sample_rate, sparse_grad=True,
                     grad_filter=eps, grad_filter_block=16)
    y = torch.randint(0, n, (b,))
    w_y = F.normalize(head.weight.detach()[y], dim=1)
    u = F.normalize(torch.randn(b, D), dim=1)
    x = 0.9 * w_y + 0.45 * u  # ~ 25-30 degrees from the class row
    x[-1] = torch.randn(D)  # and an untrained row, which keeps some blocks
    return head, x, y


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_skipped_rows_get_no_update_under_sparse_sgd(sample_rate):
    head, x, y = _peaked_head(sample_rate)
    opt = SparseSGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    before = head.weight.detach().clone()
    loss, stats = head(x, y, return_stats=True)
    loss.backward()
    fs = stats.grad_filter
    assert fs is head.last_filter_stats and fs.ready and 0 < fs.skipped_fraction < 1
    grad = head.weight.grad.coalesce()
    sampled = head.sampled_index if head.sampled_index is not None else torch.arange(head.num_rows)
    kept = sampled[fs.kept_rows]
    assert torch.equal(grad.indices()[0], kept.sort().values)  # the gradient holds the kept rows only
    assert set(y.tolist()) <= set(kept.tolist())  # every target row got its gradient
    opt.step()
    moved = (head.weight.detach() != before).any(dim=1)
    untouched = torch.ones(head.num_rows, dtype=torch.bool)
    untouched[kept] = False
    assert not moved[untouched].any() and moved[kept].all()


def test_stats_without_return_stats_and_validation():
    head, x, y = _peaked_head()
    head(x, y).backward()
    fs = head.last_filter_stats
    assert fs.ready and fs.skipped_blocks > 0 and fs.weight_bound is None and fs.row_bound is None
    with pytest.raises(RuntimeError, match="return_stats=True"):
        fs.global_bounds()
    default = PartialFC(D, 50, grad_filter=True)
    default(x, y % 50).backward()
    assert default.last_filter_stats.eps == torch.finfo(torch.float32).eps
    for bad in (-1.0, float("nan"), float("inf"), "1e-7"):
        with pytest.raises(ValueError, match="grad_filter"):
            PartialFC(D, 50, grad_filter=bad)
    with pytest.raises(ValueError, match="grad_filter_block"):
        PartialFC(D, 50, grad_filter=1e-7, grad_filter_block=0)
    assert PartialFC(D, 50, grad_filter=False).grad_filter is None

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


# --- the skip decision comes from the forward's block maxima: it must never skip a block the exact rule
# keeps, must skip what is clearly below the threshold, and the backward must not touch skipped blocks

BLOCK = 8
RULE_OPTIONS = [{}, dict(chunk_size=37), dict(sub_centers=3), dict(sub_centers=2, chunk_size=50),
                dict(margin="curricular"), dict(margin="curricular", chunk_size=40)]


def _filter_head(opts, eps, w, dtype):
    o = dict(opts)
    margin = CurricularFace(s=S, m=M) if o.pop("margin", None) == "curricular" else CombinedMargin.arcface(s=S, m=M)
    head = PartialFC(D, w.shape[0] // o.get("sub_centers", 1), margin=margin, grad_filter=eps,
                     grad_filter_block=BLOCK, **o).to(dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


def _class_blocks(n, chunk):
    """Block index of each class: blocks of BLOCK classes counted from each chunk's first class."""
    j = torch.arange(n)
    chunk = chunk or n
    return (j // chunk) * -(-chunk // BLOCK) + (j % chunk) // BLOCK


def _exact_q(opts, x, y, w, dtype, scale, monkeypatch):
    """The unfiltered backward's entries |q_ij| = |row_gain p_ij f_ij| at class level (B, n), targets
    zeroed, as the library's own exact path forms them (what its rule compares to eps |g0|)."""
    from partialfc import softmax
    seen = []
    orig = softmax._grad_block

    def spy(g, c0, c1, p):
        seen.append((c0, c1, g.detach().clone()))
        return orig(g, c0, c1, p)

    monkeypatch.setattr(softmax, "_grad_block", spy)
    head = _filter_head(opts, None, w, dtype)
    (head(x.to(dtype), y) * scale).backward()
    monkeypatch.setattr(softmax, "_grad_block", orig)
    k = opts.get("sub_centers", 1)
    n = w.shape[0] // k
    q = torch.zeros(x.shape[0], n * k, dtype=dtype)
    for c0, c1, g in seen:
        q[:, c0:c1] = g
    q = q.abs().view(x.shape[0], n, k).amax(dim=2)
    valid = y >= 0
    q[valid.nonzero().squeeze(1), y[valid]] = 0.0  # target entries are never dropped
    return q


def _skipped_classes(opts, eps, x, y, w, dtype, scale, monkeypatch, return_stats=False):
    """Run the filtered head; the classes its backward skipped (bool (n,)) and the head."""
    from partialfc import softmax
    ranges = []
    orig = softmax._FilteredBackward.skip

    def spy(self, lo, hi):
        ranges.append((lo, hi))
        return orig(self, lo, hi)

    monkeypatch.setattr(softmax._FilteredBackward, "skip", spy)
    head = _filter_head(opts, eps, w, dtype)
    out = head(x.to(dtype), y, return_stats=return_stats)
    ((out[0] if return_stats else out) * scale).backward()
    monkeypatch.setattr(softmax._FilteredBackward, "skip", orig)
    skipped = torch.zeros(w.shape[0] // opts.get("sub_centers", 1), dtype=torch.bool)
    for lo, hi in ranges:
        skipped[lo:hi] = True
    return skipped, head


@pytest.mark.parametrize("scale", [1.0, -2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("opts", RULE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_skipped_blocks_obey_the_exact_rule(opts, dtype, scale, monkeypatch):
    """Every skipped block's non-target |q_ij| (the exact path's own values) is below eps |g0|, for
    thresholds set just above and just below chosen blocks' maxima; and a block whose maximum is 0.4 %
    below the threshold is skipped: the decision is not a loose one."""
    n, k = 160, opts.get("sub_centers", 1)
    x, y, w = _problem(7, [17], n, k, peaked=True)
    # one untrained row: a spread softmax keeps many blocks
    x[5] = torch.randn(D, dtype=x.dtype, generator=torch.Generator().manual_seed(50)) * 2
    # and one row between its class and another: a hard negative of CurricularFace with |f| = t + 2 cos > 1
    x[8] = F.normalize(w[y[8] * k], dim=0) + F.normalize(w[((y[8] + 1) % n) * k], dim=0)
    q = _exact_q(opts, x, y, w, dtype, scale, monkeypatch)
    g0 = abs(scale) * S / int((y >= 0).sum())
    blocks = _class_blocks(n, opts.get("chunk_size"))
    bmax = torch.zeros(int(blocks.max()) + 1, dtype=dtype).scatter_reduce_(0, blocks, q.amax(dim=0), "amax")
    order = bmax.argsort()
    for pick in (order[len(order) // 4], order[len(order) // 2], order[(3 * len(order)) // 4], order[-1]):
        for rel in (1 + 4 * 2.0 ** -10, 1 - 1e-6):
            eps = float(bmax[pick]) * rel / g0
            skipped, head = _skipped_classes(opts, eps, x, y, w, dtype, scale, monkeypatch)
            fs = head.last_filter_stats
            assert fs.skipped_blocks == int(bmax.numel()) - int(torch.unique(blocks[~skipped]).numel())
            if skipped.any():
                worst = float(q[:, skipped].max())
                assert worst < eps * g0, (eps, worst)  # the exact rule skips them too
            if rel > 1:
                assert bool(skipped[blocks == pick].all()), (eps, float(bmax[pick]))  # the picked block goes
            if rel < 1:
                assert not bool(skipped[blocks == pick].any())  # its maximum reaches the threshold: kept


@pytest.mark.parametrize("return_stats", [False, True])
@pytest.mark.parametrize("opts", [{}, dict(chunk_size=40), dict(chunk_size=44, sub_centers=2),
                                  dict(margin="curricular"), dict(margin="curricular", chunk_size=24)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_backward_recomputes_and_multiplies_only_kept_blocks(opts, return_stats, monkeypatch):
    """The backward's logits recomputation (chunked path, CurricularFace) and its products cover exactly
    the kept blocks' classes, with or without a bound (the bound never recomputes a skipped block), and
    none at all when every block is skipped."""
    from partialfc import softmax
    n, k = 160, opts.get("sub_centers", 1)
    x, y, w = _problem(11, [15], n, k, peaked=True)
    # an untrained row: keeps the blocks of its nearest classes
    x[3] = torch.randn(D, dtype=x.dtype, generator=torch.Generator().manual_seed(30)) * 2
    in_backward = [False]
    recomputed, multiplied, skipped = [], [], []
    orig_logits, orig_grad, orig_skip = softmax._block_logits, softmax._grad_block, softmax._FilteredBackward.skip

    def spy_logits(xhat_mm, w_mm, col_scale, c0, c1, *rest):
        if in_backward[0]:
            recomputed.append(c1 - c0)
        return orig_logits(xhat_mm, w_mm, col_scale, c0, c1, *rest)

    def spy_grad(g, c0, c1, p):
        multiplied.append((c1 - c0) // k)
        return orig_grad(g, c0, c1, p)

    def spy_skip(self, lo, hi):
        skipped.append(hi - lo)
        return orig_skip(self, lo, hi)

    monkeypatch.setattr(softmax, "_block_logits", spy_logits)
    monkeypatch.setattr(softmax, "_grad_block", spy_grad)
    monkeypatch.setattr(softmax._FilteredBackward, "skip", spy_skip)
    recompute = "chunk_size" in opts or "margin" in opts
    for eps in (1e-3, 1.0):  # some blocks kept; every block skipped (no non-target p reaches 1)
        recomputed.clear(), multiplied.clear(), skipped.clear()
        head = _filter_head(opts, eps, w.float(), torch.float32)
        out = head(x.float(), y, return_stats=return_stats)
        in_backward[0] = True
        (out[0] if return_stats else out).backward()
        in_backward[0] = False
        fs = head.last_filter_stats
        if eps == 1.0:
            assert fs.skipped_blocks == fs.blocks and not recomputed and not multiplied
        else:
            assert 0 < fs.skipped_blocks < fs.blocks
        assert sum(multiplied) + sum(skipped) == n  # every class once, kept or skipped
        assert sum(recomputed) == (sum(multiplied) if recompute else 0)
        if return_stats:
            assert fs.weight_bound is not None and bool(torch.isfinite(fs.weight_bound))


def test_repeated_backward_recomputes_and_stays_bounded():
    """A second backward (retain_graph) of a materialized filtered forward recomputes the logits (the
    buffer was turned into the first gradient) and bounds the weights from the forward's figures: the
    same gradient, the same skipped blocks, and a bound that holds."""
    n = 120
    x, y, w = _problem(4, [14], n, 1, peaked=True)
    x[6] = torch.randn(D, dtype=x.dtype, generator=torch.Generator().manual_seed(60)) * 2
    exact = _head({}, None, n)
    ref_gx, ref_gw = _run(exact, w, x, y, stats=False)
    head = _head({}, 1e-3, n)
    with torch.no_grad():
        head.weight.copy_(w)
    xx = x.clone().requires_grad_()
    loss, _ = head(xx, y, return_stats=True)
    results = []
    for retain in (True, False):
        head.weight.grad, xx.grad = None, None
        loss.backward(retain_graph=retain)
        fs = head.last_filter_stats
        results.append((xx.grad.clone(), head.weight.grad.clone(), fs.skipped_blocks, float(fs.weight_bound),
                        fs.row_bound.clone()))
    (gx1, gw1, sk1, wb1, rb1), (gx2, gw2, sk2, wb2, rb2) = results
    assert 0 < sk1 == sk2 < head.last_filter_stats.blocks
    assert torch.allclose(gx1, gx2, rtol=1e-10, atol=1e-14) and torch.allclose(gw1, gw2, rtol=1e-10, atol=1e-14)
    assert torch.allclose(rb1, rb2, rtol=1e-12)  # the same row bound: both from the forward's block sums
    for gw, wb in ((gw1, wb1), (gw2, wb2)):
        err = float((gw - ref_gw).norm())
        assert 0 < err <= wb, (err, wb)
    assert wb2 >= wb1  # the recomputing backward's bound is the looser form


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), (64, 64), (1, 7), (300, 5)])
def test_gram_bound_bounds_the_largest_singular_value(shape):
    from partialfc.softmax import _gram_bound
    g = torch.Generator().manual_seed(sum(shape))
    for x in (torch.randn(shape, generator=g), F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=1),
              torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)):  # rank 1
        sigma2 = float(torch.linalg.matrix_norm(x.double(), ord=2)) ** 2
        bound = _gram_bound(x)
        assert sigma2 <= bound <= float(x.double().norm()) ** 2 * (1 + 1e-9)
        if x.shape[1] == 1 or x.shape[0] == 1 or bool((torch.linalg.matrix_rank(x.double()) == 1)):
            assert bound <= sigma2 * (1 + 1e-9)  # rank 1: ||G^2||_F^(1/2) is the eigenvalue
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    assert _gram_bound(q) <= 64 ** 0.125 * (1 + 1e-9)  # flat spectrum: k^(1/4) squared twice, far below ||x||_F^2
    assert _gram_bound(torch.full((3, 4), float("nan"))) != _gram_bound(torch.full((3, 4), float("nan")))  # NaN


@pytest.mark.parametrize("chunk_size", [None, 9])
def test_eps_zero_under_bf16_autocast_is_the_exact_head_bit_for_bit(chunk_size):
    torch.manual_seed(4)
    n, b = 90, 11
    x = torch.randn(b, D) * 3
    y = torch.randint(0, n, (b,))
    grads = []
    for eps in (None, 0.0):
        head = PartialFC(D, n, margin=CombinedMargin.arcface(s=S, m=M), grad_filter=eps, grad_filter_block=8,
                         seed=2, chunk_size=chunk_size)
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(xx, y)
        loss.backward()
        grads.append((loss.detach(), xx.grad, head.weight.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def test_recomputing_backward_defers_its_gram_bound(monkeypatch):
    """The chunked path's weight bound needs ||x^||_2 (two small float64 products): computed when
    ``weight_bound`` is first read, once, not by the backward (the trainer only logs the skipped share)."""
    from partialfc import softmax
    calls = []
    orig = softmax._gram_bound
    monkeypatch.setattr(softmax, "_gram_bound", lambda x, *a: calls.append(1) or orig(x, *a))
    n = 120
    x, y, w = _problem(4, [14], n, 1, peaked=True)
    head = _head(dict(chunk_size=40), 1e-3, n)
    _, gw = _run(head, w, x, y, stats=True)
    fs = head.last_filter_stats
    assert 0 < fs.skipped_blocks and not calls  # the backward did not compute it
    bound = fs.weight_bound
    assert len(calls) == 1 and fs.weight_bound is bound and len(calls) == 1
    _, ref_gw = _run(_head(dict(chunk_size=40), None, n), w, x, y, stats=False)
    assert 0 < float((gw - ref_gw).norm()) <= float(bound)
    assert fs.global_bounds().weight_bound == bound and len(calls) == 1


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("chunk_size", [None, 40])
def test_sparse_gradient_is_the_dense_filtered_gradient_at_the_kept_rows(sample_rate, chunk_size, monkeypatch):
    """sparse_grad: the loss leaves the skipped rows of its dense gradient unwritten (only the kept rows
    are read) and, without sampling, works on the weight itself (no copy of every row): the sparse
    gradient holds exactly the dense filtered head's rows that were kept, bit for bit."""
    from partialfc import grad_filter
    copies = []
    orig = torch.Tensor.index_select
    monkeypatch.setattr(grad_filter.torch.Tensor, "index_select",
                        lambda t, dim, idx: copies.append(idx.numel()) or orig(t, dim, idx))
    grads = []
    for sparse in (False, True):
        head, x, y = _peaked_head(sample_rate)
        head.sparse_grad = sparse
        head.chunk_size = chunk_size
        copies.clear()
        head(x, y).backward()
        fs = head.last_filter_stats
        assert fs.rows_kept_only == sparse and 0 < fs.skipped_fraction < 1
        g = head.weight.grad
        grads.append((g.coalesce() if sparse else g, fs.kept_rows, head.sampled_index))
        if sparse and sample_rate == 1.0:
            assert head.num_rows not in copies  # the weight was not copied
    (dense, kept, index), (sparse, kept_s, index_s) = grads
    assert torch.equal(kept, kept_s) and (index is None or torch.equal(index, index_s))
    rows = (torch.arange(head.num_rows) if index is None else index)[kept]
    assert torch.equal(sparse.indices()[0], rows.sort().values)
    assert torch.equal(sparse.to_dense()[rows], dense[rows])

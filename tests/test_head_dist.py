"""Multi-rank head on real gloo process groups (CPU), against the single-process float64 oracle."""
import pytest
import torch

from partialfc import CombinedMargin, PartialFC, shard_bounds
from tests.dist_utils import run_distributed
from tests.oracle import reference_grads

CASES = [
    # name, margin, chunk_size
    ("arcface", CombinedMargin.arcface(s=16.0, m=0.5), None),
    ("arcface_chunked", CombinedMargin.arcface(s=16.0, m=0.5), 5),
    ("linear", CombinedMargin.arcface(s=16.0, m=0.5, extension="linear"), None),
    ("none", CombinedMargin(s=16.0, m2=0.5, extension="none"), 4),
    ("cosface", CombinedMargin.cosface(s=16.0, m=0.35), None),
    ("sphereface", CombinedMargin.sphereface(s=16.0, m=1.7), 3),
    ("combined", CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.15), None),
    ("straight_through", CombinedMargin.arcface(s=16.0, m=0.5, straight_through=True), None),
]


def _margin_kwargs(m):
    return dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, extension=m.extension, straight_through=m.straight_through)


def _check_against_oracle(rank, world, num_classes, batch_sizes):
    """Every rank builds the same global problem from a seed and checks its own part of it."""
    d = 8
    for step, (name, margin, chunk) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + step)
        sizes = [b[step % len(b)] if isinstance(b, list) else b for b in batch_sizes]
        total = sum(sizes)
        x_all = torch.randn(total, d, generator=g, dtype=torch.float64) * 2
        y_all = torch.randint(0, num_classes, (total,), generator=g)
        if total > 2:
            y_all[1] = -100
        w_all = torch.randn(num_classes, d, generator=g, dtype=torch.float64)
        ref_loss, ref_gx, ref_gw = reference_grads(x_all, w_all, y_all, **_margin_kwargs(margin))

        head = PartialFC(d, num_classes, margin=margin, chunk_size=chunk).double()
        start, end = shard_bounds(num_classes, world, rank)
        assert (head.class_start, head.class_end) == (start, end)
        with torch.no_grad():
            head.weight.copy_(w_all[start:end])
        lo = sum(sizes[:rank])
        x = x_all[lo: lo + sizes[rank]].clone().requires_grad_()
        loss = head(x, y_all[lo: lo + sizes[rank]])
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(head.weight.grad, ref_gw[start:end], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
        # DDP convention: the local embedding gradient is world-size times the exact one
        torch.testing.assert_close(x.grad, world * ref_gx[lo: lo + sizes[rank]], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    return True


@pytest.mark.parametrize("world,num_classes,batch_sizes", [
    (2, 37, [5, 9]),
    (3, 1003, [[4, 7], [0, 6], [11, 1]]),  # unequal, a rank with no samples, sizes change per step
    (4, 37, [3, 3, 3, 3]),
])
def test_distributed_matches_oracle(world, num_classes, batch_sizes):
    assert run_distributed(_check_against_oracle, world, num_classes, batch_sizes) == [True] * world


def _bad_label_on_one_rank(rank, world):
    head = PartialFC(4, 10)
    labels = torch.tensor([1, 2, 3]) if rank != 1 else torch.tensor([1, 12, 3])
    try:
        head(torch.randn(3, 4), labels)
    except ValueError as e:
        return str(e)
    return "no error"


def _bad_width_on_one_rank(rank, world):
    head = PartialFC(4, 10)
    x = torch.randn(3, 4 if rank != 2 else 5)
    try:
        head(x, torch.tensor([1, 2, 3]))
    except ValueError as e:
        return str(e)
    return "no error"


def _uniform_batch_broken(rank, world):
    head = PartialFC(4, 10, uniform_batch=True)
    try:
        head(torch.randn(2 + rank, 4), torch.zeros(2 + rank, dtype=torch.long))
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_label_on_one_rank_same_error_everywhere():
    """Regression for insightface's silent loss of 69.08 on out-of-range labels: every rank raises."""
    messages = run_distributed(_bad_label_on_one_rank, 2)
    assert messages[0] == messages[1]
    assert "rank 1" in messages[0] and "e.g. 12" in messages[0] and "[0, 10)" in messages[0]


def test_bad_shape_on_one_rank_same_error_everywhere():
    messages = run_distributed(_bad_width_on_one_rank, 3)
    assert len(set(messages)) == 1 and "rank 2" in messages[0] and "width 5" in messages[0]


def test_uniform_batch_promise_checked():
    messages = run_distributed(_uniform_batch_broken, 2)
    assert len(set(messages)) == 1 and "uniform_batch" in messages[0]


def _explicit_subgroup(rank, world):
    """A head over an explicit subgroup {0, 1} of a 3-rank world; rank 2 is not in it."""
    import torch.distributed as dist
    sub = dist.new_group([0, 1])
    if rank == 2:
        return None
    head = PartialFC(4, 7, group=sub).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    loss = head(x, torch.tensor([0, 3, 6]))
    return head.world_size, (head.class_start, head.class_end), float(loss)


def test_explicit_group_is_used():
    results = run_distributed(_explicit_subgroup, 3)
    assert results[0][0] == 2 and results[0][1] == (0, 4) and results[1][1] == (4, 7)
    assert results[0][2] == results[1][2]

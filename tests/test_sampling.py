"""Partial FC class sampling, id-based initialisation and sparse row gradients."""
import math

import pytest
import torch

from partialfc import CombinedMargin, PartialFC, shard_bounds
from partialfc.optim import SparseSGD
from partialfc.sampling import sample_classes
from tests.dist_utils import run_distributed
from tests.oracle import reference_grads

MARGIN = CombinedMargin(s=16.0, m1=1.1, m2=0.4, m3=0.1)
MK = dict(s=16.0, m1=1.1, m2=0.4, m3=0.1)


def _sampled_vs_oracle(rank, world, num_classes, rate, sizes, sparse):
    import torch.distributed as dist
    d = 6
    g = torch.Generator().manual_seed(7)
    total = sum(sizes)
    x_all = torch.randn(total, d, generator=g, dtype=torch.float64)
    y_all = torch.randint(0, num_classes, (total,), generator=g)
    head = PartialFC(d, num_classes, margin=MARGIN, sample_rate=rate, sparse_grad=sparse, seed=3).double()
    w_all = torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w_all[head.class_start:head.class_end])
    lo = sum(sizes[:rank])
    x = x_all[lo:lo + sizes[rank]].clone().requires_grad_()
    loss = head(x, y_all[lo:lo + sizes[rank]])
    loss.backward()
    index = head.sampled_index
    # positives of this shard are always in the sample
    local = y_all - head.class_start
    positives = torch.unique(local[(local >= 0) & (local < head.num_local)])
    assert bool(torch.isin(positives, index).all())
    assert torch.equal(index, torch.sort(index).values) and index.unique().numel() == index.numel()
    expected_k = min(head.num_local, max(math.ceil(rate * head.num_local), positives.numel()))
    assert index.numel() == expected_k, (index.numel(), expected_k)
    # oracle over the union of every rank's sample
    gathered = [None] * world
    dist.all_gather_object(gathered, (index + head.class_start).tolist())
    union = torch.tensor(sorted(sum(gathered, [])))
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[union] = torch.arange(union.numel())
    ref_loss, ref_gx, ref_gw_union = reference_grads(x_all, w_all[union], remap[y_all], **MK)
    ref_gw = torch.zeros_like(w_all)
    ref_gw[union] = ref_gw_union
    grad = head.weight.grad
    if sparse:
        assert grad.is_sparse
        assert torch.equal(grad.coalesce().indices()[0], index)
        grad = grad.to_dense()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grad, ref_gw[head.class_start:head.class_end], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, world * ref_gx[lo:lo + sizes[rank]], rtol=1e-9, atol=1e-12)
    return index.tolist()


@pytest.mark.parametrize("world,num_classes,rate,sizes,sparse", [
    (2, 101, 0.2, [6, 3], False),
    (3, 200, 0.1, [4, 0, 9], True),
    (2, 21, 0.1, [12, 12], False),  # planned sample (2) smaller than the positives: grows to fit
])
def test_sampled_loss_matches_oracle_on_union(world, num_classes, rate, sizes, sparse):
    samples = run_distributed(_sampled_vs_oracle, world, num_classes, rate, sizes, sparse)
    assert len(samples) == world


def _init_shards(rank, world, num_classes, d):
    return PartialFC(d, num_classes, seed=11).weight.detach()


def test_init_independent_of_world_size():
    """Regression for insightface seeding every rank alike: shards concatenate to one matrix."""
    num_classes, d = 20000, 4  # spans several 8192-row blocks, uneven shards
    full = PartialFC(d, num_classes, seed=11).weight.detach()
    shards = run_distributed(_init_shards, 3, num_classes, d)
    assert torch.equal(torch.cat(shards), full)
    assert not torch.equal(shards[0][:100], shards[1][:100])
    assert abs(float(full.std()) - 0.01) < 5e-4
    assert not torch.equal(PartialFC(d, num_classes, seed=12).weight, full)


def test_sampling_deterministic_and_rank_independent():
    target = torch.tensor([3, -1, 50, 3, 7])
    gen = lambda seed: torch.Generator().manual_seed(seed)
    a, ta = sample_classes(target, 100, 0.1, gen(1))
    b, tb = sample_classes(target, 100, 0.1, gen(1))
    c, _ = sample_classes(target, 100, 0.1, gen(2))
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)
    assert a.numel() == 10 and bool(torch.isin(torch.tensor([3, 50, 7]), a).all())
    assert torch.equal(a[ta[ta >= 0]], target[target >= 0])  # remapped targets point at their class
    assert int(ta[1]) == -1


def test_head_samples_reproducibly_per_step():
    x, y = torch.randn(6, 4), torch.tensor([0, 5, 9, 40, 41, 99])
    h1, h2 = PartialFC(4, 100, sample_rate=0.1, seed=5), PartialFC(4, 100, sample_rate=0.1, seed=5)
    s1 = [h1(x, y) and h1.sampled_index.clone() for _ in range(3)]
    s2 = [h2(x, y) and h2.sampled_index.clone() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert not torch.equal(s1[0], s1[1])  # a new draw every step
    h3 = PartialFC(4, 100, sample_rate=0.1, seed=5)
    h3.load_state_dict(h1.state_dict())  # resumes the step counter, so the next draw matches
    h1(x, y), h3(x, y)
    assert torch.equal(h1.sampled_index, h3.sampled_index)


def test_rate_close_to_one_equals_full_head():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 37, (8,))
    full = PartialFC(5, 37, margin=MARGIN).double()
    sampled = PartialFC(5, 37, margin=MARGIN, sample_rate=0.99).double()  # ceil(0.99 * 37) = 37
    results = []
    for head in (full, sampled):
        xx = x.clone().requires_grad_()
        loss = head(xx, y)
        loss.backward()
        results.append((loss.detach(), xx.grad, head.weight.grad))
    assert sampled.sampled_index.numel() == 37
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sparse_grad_with_sparse_sgd_touches_only_sampled_rows():
    torch.manual_seed(1)
    head = PartialFC(8, 500, sample_rate=0.05, sparse_grad=True)
    opt = SparseSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = head.weight.detach().clone()
    loss = head(torch.randn(16, 8), torch.randint(0, 500, (16,)))
    loss.backward()
    opt.step()
    changed = (head.weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, head.sampled_index)
    assert head.weight.grad.is_sparse


def test_sparse_grad_with_torch_sparse_adam():
    head = PartialFC(8, 300, sample_rate=0.1, sparse_grad=True)
    opt = torch.optim.SparseAdam(head.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        head(torch.randn(4, 8), torch.randint(0, 300, (4,))).backward()
        opt.step()


def _clip_sharded(rank, world):
    from partialfc import clip_grad_norm_
    rep = torch.nn.Parameter(torch.zeros(3))
    rep.grad = torch.full((3,), 2.0)  # identical on every rank: counted once
    sh = torch.nn.Parameter(torch.zeros(5, 2))
    sh.grad = torch.sparse_coo_tensor([[rank]], torch.full((1, 2), float(rank + 1)), (5, 2))
    total = clip_grad_norm_([rep], [sh], max_norm=1.0)
    return float(total), rep.grad.tolist(), sh.grad.to_dense().tolist()


def test_clip_grad_norm_counts_shards_once_each():
    results = run_distributed(_clip_sharded, 2)
    expected = math.sqrt(3 * 4 + 2 * 1 + 2 * 4)
    for rank, (total, rep, sh) in enumerate(results):
        assert total == pytest.approx(expected, rel=1e-6)
        assert rep == pytest.approx([2.0 / expected] * 3, rel=1e-5)
        assert sh[rank] == pytest.approx([(rank + 1) / expected] * 2, rel=1e-5)

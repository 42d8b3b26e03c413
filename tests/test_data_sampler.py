"""ShardedSampler: exact coverage without padding, and resume across world sizes."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from launch.data.sampler import ShardedSampler


def shards(n, world, batch=1, epoch=0, seed=0, **kw):
    out = []
    for r in range(world):
        s = ShardedSampler(n, world, r, batch_size=batch, seed=seed, **kw)
        s.set_epoch(epoch)
        idx = list(s)
        assert len(idx) == len(s)
        out.append(idx)
    return out


def batches(idx, batch):
    return [idx[k:k + batch] for k in range(0, len(idx), batch)]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 13, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_index_once_and_no_single_sample_batches(n, world, batch):
    parts = shards(n, world, batch)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # no padding duplicates
    rest = n % (world * batch)
    dropped = rest if batch > 1 and rest < 2 * world else 0  # the incomplete step, see the docstring
    order = ShardedSampler(n, world, 0, batch_size=batch).epoch_order().tolist()
    assert sorted(flat) == sorted(order[:n - dropped])
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= batch  # near-even split
    if batch > 1:  # no batch of one sample, and the same number of batches on every rank
        assert all(len(b) > 1 for p in parts for b in batches(p, batch))
        assert len({len(batches(p, batch)) for p in parts}) == 1
    elif n % world == 0:
        assert len(set(sizes)) == 1


@pytest.mark.parametrize("n,world,batch,steps", [(17, 1, 8, 2), (17, 2, 8, 1), (3, 2, 8, 0), (1, 1, 8, 0),
                                                 (20, 2, 8, 2), (3, 2, 1, 2), (23, 2, 4, 2)])
def test_steps_left_counts_the_batches_every_rank_gets(n, world, batch, steps):
    samplers = [ShardedSampler(n, world, r, batch_size=batch, drop_last=n == 23) for r in range(world)]
    assert [s.steps_left() for s in samplers] == [steps] * world
    assert max(len(batches(list(s), batch)) for s in samplers) == steps
    samplers[0].advance(world * batch)
    assert samplers[0].steps_left() == max(0, steps - 1)


@pytest.mark.parametrize("world", [1, 2])
def test_batchnorm_never_gets_a_single_sample_batch(world):
    """17 images, batch 8: the 17th alone crashed BatchNorm ("Expected more than 1 value per
    channel when training"); it is dropped on one rank and on two."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(17, 1, 4, 4), torch.arange(17))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5)).train()
    seen = []
    for rank in range(world):
        sampler = ShardedSampler(len(ds), world, rank, batch_size=8, seed=0)
        sizes = []
        for x, y in DataLoader(ds, batch_size=8, sampler=sampler):
            model(x).sum().backward()
            sizes.append(len(y))
            seen += y.tolist()
        assert sizes == [8] * (2 // world) and len(sampler) == 16 // world
    assert len(set(seen)) == 16


def test_shuffle_is_seeded_and_changes_per_epoch():
    a = shards(101, 1, epoch=0)[0]
    assert a == shards(101, 1, epoch=0)[0]
    assert a != shards(101, 1, epoch=1)[0]
    assert a != shards(101, 1, epoch=0, seed=5)[0]
    assert a != list(range(101))
    assert shards(10, 1, shuffle=False)[0] == list(range(10))


def test_unshuffled_layout_per_step():
    # 2 ranks, batch 3, N=16: steps [0..5], [6..11], last 4 split 2/2
    assert shards(16, 2, 3, shuffle=False) == [[0, 1, 2, 6, 7, 8, 12, 13], [3, 4, 5, 9, 10, 11, 14, 15]]
    # N=14: the last 2 would be split 1/1, single-sample batches: dropped
    assert shards(14, 2, 3, shuffle=False) == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    # N=15: 2/1 would leave rank 1 a single sample: the step is dropped on both ranks
    assert shards(15, 2, 3, shuffle=False) == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]


def test_drop_last_gives_full_batches_only():
    parts = shards(23, 2, 4, drop_last=True)
    assert [len(p) for p in parts] == [8, 8]  # 23 // 8 = 2 global steps
    assert len(set(parts[0]) | set(parts[1])) == 16


@pytest.mark.parametrize("old_world,old_batch,steps,new_world,new_batch",
                         [(3, 4, 5, 2, 5), (2, 3, 7, 4, 1), (4, 2, 1, 1, 8), (1, 5, 20, 3, 2)])
def test_resume_with_other_world_size_covers_the_rest(old_world, old_batch, steps,
                                                      new_world, new_batch):
    n, epoch = 101, 2
    old = [ShardedSampler(n, old_world, r, batch_size=old_batch, seed=9) for r in range(old_world)]
    consumed = set()
    for s in old:
        s.set_epoch(epoch)
    iters = [iter(s) for s in old]
    for _ in range(steps):  # every rank takes one batch per step
        for it in iters:
            for _ in range(old_batch):
                consumed.add(next(it))
        for s in old:
            s.advance(old_world * old_batch)
    state = old[0].state_dict()
    assert state["consumed"] == len(consumed) == steps * old_world * old_batch
    assert state["epoch"] == epoch
    # the consumed samples are exactly a prefix of the epoch order
    assert consumed == set(old[0].epoch_order()[: len(consumed)].tolist())

    rest = []
    for r in range(new_world):
        s = ShardedSampler(n, new_world, r, batch_size=new_batch, seed=0)
        s.load_state_dict(state)
        s.set_epoch(epoch)  # the loop calls it again on resume: keeps the offset
        rest.append(list(s))
    flat = [i for p in rest for i in p]
    assert len(flat) == len(set(flat))
    left = n - len(consumed)
    tail = left % (new_world * new_batch)
    dropped = tail if new_batch > 1 and tail < 2 * new_world else 0  # no single-sample batches
    assert set(flat) == set(old[0].epoch_order()[len(consumed):n - dropped].tolist())

    # the next epoch starts from the beginning again
    s.set_epoch(epoch + 1)
    nxt = shards(n, new_world, new_batch, epoch=epoch + 1, seed=9)
    assert list(s) == nxt[-1]


def test_state_dict_validation_and_default_world():
    s = ShardedSampler(10)
    assert (s.num_replicas, s.rank) == (1, 0)
    s.advance(4)
    assert s.state_dict() == {"epoch": 0, "consumed": 4, "seed": 0, "num_samples": 10}
    with pytest.raises(ValueError):
        ShardedSampler(11).load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        ShardedSampler(10, 2, 2)
    t = ShardedSampler(10, shuffle=False)
    t.load_state_dict(s.state_dict())
    assert list(t) == [4, 5, 6, 7, 8, 9]

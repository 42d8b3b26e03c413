"""head.predict: the top-k classes by cosine over all shards, against a float64 single-process oracle."""
import pytest
import torch

from partialfc import PartialFC, init_weight_rows_, shard_bounds
from tests.dist_utils import run_distributed

D = 6


def _full_weight(num_classes, seed=0):
    return init_weight_rows_(torch.empty(num_classes, D), 0, seed)


def _oracle(x, weight, k):
    """float64 cosines, sorted by (score descending, class id ascending)."""
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(weight.double(), dim=1).T
    ids = torch.arange(weight.shape[0]).expand_as(cos)
    keys = [sorted(zip((-row).tolist(), list(range(weight.shape[0]))))[:k] for row in cos]
    scores = torch.tensor([[-s for s, _ in row] for row in keys], dtype=torch.float64).reshape(-1, k)
    return scores, torch.tensor([[i for _, i in row] for row in keys], dtype=torch.int64).reshape(-1, k), ids


def _batch(rank, n):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(10 + rank))


def test_single_rank_matches_the_oracle():
    head = PartialFC(D, 23, seed=3)
    x = _batch(0, 9)
    for k in (1, 5, 23):
        scores, ids = head.predict(x, k=k)
        ref_s, ref_i, _ = _oracle(x, head.weight.detach(), k)
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(scores.double(), ref_s, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        head.predict(x, k=24)


def test_ties_go_to_the_lower_class_id():
    head = PartialFC(D, 10)
    axis = torch.zeros(D)
    axis[0] = 0.5  # one non-zero entry: every cosine with it is computed exactly, whatever the kernel
    with torch.no_grad():
        head.weight[7] = axis
        head.weight[2] = axis * 4
    _, ids = head.predict(axis.unsqueeze(0), k=2)
    assert ids.tolist() == [[2, 7]]


def _sharded(rank, world, num_classes, batches, k, tie):
    head = PartialFC(D, num_classes)
    full = _full_weight(num_classes)
    if tie is not None:  # classes a and b get the same axis direction: exactly equal cosines
        axis = torch.zeros(D)
        axis[0] = 1.0
        for c, scale in zip(tie, (0.5, 2.0)):
            full[c] = axis * scale
            with torch.no_grad():
                if head.class_start <= c < head.class_end:
                    head.weight[c - head.class_start] = full[c]
    x = _batch(rank, batches[rank])
    if tie is not None and x.shape[0]:
        x[0] = torch.eye(D)[0] * 3.0
    scores, ids = head.predict(x, k=k)
    ref_s, ref_i, _ = _oracle(x, full, k)
    return torch.equal(ids, ref_i), (scores.double() - ref_s).abs().max().item() if x.shape[0] else 0.0, \
        list(shard_bounds(num_classes, world, rank)), ids.shape


@pytest.mark.parametrize("world,num_classes,batches,k,tie", [
    (2, 11, [4, 0], 3, (8, 1)),      # an empty rank, a tie across shards
    (3, 5, [3, 1, 2], 4, None),      # k larger than every shard (2, 2, 1 classes)
    (3, 23, [2, 5, 0], 5, (20, 3)),  # a tie between the last and the first shard
])
def test_sharded_matches_the_oracle(world, num_classes, batches, k, tie):
    for rank, (same_ids, err, _, shape) in enumerate(run_distributed(_sharded, world, num_classes, batches, k, tie)):
        assert same_ids and err < 1e-6 and tuple(shape) == (batches[rank], k)


def test_merge_breaks_ties_by_the_lower_id():
    """Candidates of equal score from different ranks, as the merge sees them: lower id first."""
    from partialfc.predict import _best_k
    scores = torch.tensor([[0.5, 0.75, 0.75, 0.125, 0.75]])
    ids = torch.tensor([[4, 17, 3, 0, 9]])
    best_s, best_i = _best_k(scores, ids, 4)
    assert best_i.tolist() == [[3, 9, 17, 4]] and best_s.tolist() == [[0.75, 0.75, 0.75, 0.5]]


def _bad_on_one(rank, world):
    head = PartialFC(D, 8)
    x = torch.randn(3, D + 1 if rank == 1 else D)
    try:
        head.predict(x, k=2)
    except ValueError as err:
        return str(err)
    return "no error"


def test_bad_input_on_one_rank_is_the_same_error_everywhere():
    messages = run_distributed(_bad_on_one, 2)
    assert messages[0] == messages[1] and "rank(s) [1]" in messages[0]

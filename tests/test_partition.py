import numpy as np
import pytest

from partialfc import owner_of, shard_bounds, shard_sizes


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("num_classes", [8, 37, 1003, 32003])
def test_shards_match_array_split(world, num_classes):
    """np.array_split gives the first C % W parts one more element: the same rule as ours."""
    parts = np.array_split(np.arange(num_classes), world)
    assert shard_sizes(num_classes, world) == [len(p) for p in parts]
    for rank, part in enumerate(parts):
        assert shard_bounds(num_classes, world, rank) == (int(part[0]), int(part[-1]) + 1)
        for c in (part[0], part[len(part) // 2], part[-1]):
            assert owner_of(int(c), num_classes, world) == rank


def test_insightface_formula():
    """The documented closed form: C//W + (r < C%W) classes from r*(C//W) + min(r, C%W)."""
    for c, w in [(10, 4), (1003, 8), (37, 3)]:
        for r in range(w):
            start = r * (c // w) + min(r, c % w)
            assert shard_bounds(c, w, r) == (start, start + c // w + (r < c % w))


@pytest.mark.parametrize("args", [(3, 4, 0), (10, 0, 0), (10, 2, 2), (10, 2, -1)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        shard_bounds(*args)

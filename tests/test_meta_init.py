"""A head built on the meta device, as large models are built: ``PartialFC(..., device="meta")``,
then ``head.to_empty(device=...)`` and ``head.reset_parameters()`` give exactly the rows of a head
built on that device directly (the init draws by global class id; meta and fake weights are skipped)."""
import pytest
import torch

from partialfc import PartialFC, init_weight_rows_
from partialfc.init import BLOCK_ROWS
from tests.dist_utils import run_distributed

_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.dtype])


def _via_meta(*args, device="cpu", **kwargs) -> PartialFC:
    head = PartialFC(*args, device="meta", **kwargs)
    assert head.weight.is_meta
    head.to_empty(device=device)
    head.reset_parameters()
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_meta_then_to_empty_equals_direct(dtype):
    classes = 2 * BLOCK_ROWS + 123  # three init blocks, the last one partial
    direct = PartialFC(24, classes, seed=7, dtype=dtype)
    head = _via_meta(24, classes, seed=7, dtype=dtype)
    assert head.weight.dtype == dtype and head.weight.device.type == "cpu"
    assert torch.equal(_bits(head.weight), _bits(direct.weight))
    assert head.weight.requires_grad and isinstance(head.weight, torch.nn.Parameter)


def test_meta_head_trains_like_the_direct_one():
    torch.manual_seed(0)
    x, y = torch.randn(16, 32), torch.randint(0, 5000, (16,))
    heads = [PartialFC(32, 5000, seed=1), _via_meta(32, 5000, seed=1)]
    grads = []
    for head in heads:
        head(x.clone().requires_grad_(), y).backward()
        grads.append(head.weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_meta_and_fake_weights_are_left_alone():
    from torch._subclasses.fake_tensor import FakeTensorMode
    meta = torch.empty(3 * BLOCK_ROWS, 8, device="meta")
    assert init_weight_rows_(meta, class_start=BLOCK_ROWS // 2, seed=3) is meta  # no generator on meta
    with FakeTensorMode():
        fake = torch.empty(3 * BLOCK_ROWS, 8)
        assert init_weight_rows_(fake, class_start=5, seed=3) is fake
    # a real weight at an offset gets the rows of the full matrix
    full = init_weight_rows_(torch.empty(3 * BLOCK_ROWS, 8), class_start=0, seed=3)
    part = init_weight_rows_(torch.empty(BLOCK_ROWS, 8), class_start=BLOCK_ROWS // 2, seed=3)
    assert torch.equal(part, full[BLOCK_ROWS // 2: BLOCK_ROWS // 2 + BLOCK_ROWS])


def test_meta_head_under_fake_tensors():
    """The planner's path: a meta head given fake storage runs a step without any allocation."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    head = PartialFC(64, 50_000, device="meta", validate=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        head.to_empty(device="cpu")
        head.reset_parameters()
        loss = head(torch.randn(8, 64, requires_grad=True), torch.randint(0, 50_000, (8,)))
        loss.backward()
        assert head.weight.grad.shape == (50_000, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_meta_then_cuda_equals_direct_cuda():
    direct = PartialFC(24, BLOCK_ROWS + 5, seed=2, device="cuda")
    head = _via_meta(24, BLOCK_ROWS + 5, seed=2, device="cuda")
    assert torch.equal(_bits(head.weight), _bits(direct.weight))


def _shards(rank, world, classes, d):
    direct = PartialFC(d, classes, seed=5)
    head = _via_meta(d, classes, seed=5)
    assert (head.class_start, head.class_end) == (direct.class_start, direct.class_end)
    return direct.weight.detach(), head.weight.detach()


def test_two_gloo_ranks_meta_equals_direct_and_the_full_matrix():
    classes, d = BLOCK_ROWS + 1001, 16  # odd: rank 0 holds one row more; the shard boundary splits a block
    shards = run_distributed(_shards, 2, classes, d)
    for direct, meta in shards:
        assert torch.equal(_bits(meta), _bits(direct))
    full = PartialFC(d, classes, seed=5).weight.detach()  # one rank holds every class
    assert torch.equal(_bits(torch.cat([meta for _, meta in shards])), _bits(full))

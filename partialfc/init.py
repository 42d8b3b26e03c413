"""Weight initialisation by global class id, so the full matrix does not depend on the world size.

The (num_classes, d) matrix is generated in fixed blocks of ``BLOCK_ROWS`` global rows, block
``b`` from its own generator seeded by ``(seed, b)``. A rank generates only the blocks that
overlap its shard (at most two partial blocks of waste), so concatenating every rank's shard
gives the same matrix for any number of ranks. Values are drawn in float32 on the weight's
device, then cast: the same seed gives the same matrix on every world size and dtype of one
device type (CPU and CUDA generators differ).

Tensors without data (``device="meta"``, or fake tensors under ``FakeTensorMode``) are left as
they are: a head built on ``meta`` gets its rows once it has storage, from
``head.to_empty(device=...)`` followed by ``head.reset_parameters()``, the same rows as a head
built on that device directly.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 8192
DEFAULT_STD = 0.01  # insightface's recipe; only the rows' directions matter for the logits


def has_no_data(t: torch.Tensor) -> bool:
    """True for a tensor without storage to fill: on the ``meta`` device, or a fake tensor."""
    if t.is_meta:
        return True
    from torch._subclasses.fake_tensor import is_fake  # lazy: a heavier import than this module
    return is_fake(t)


def _block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 0x5EED) % (2**63 - 1)


@torch.no_grad()
def init_weight_rows_(weight: torch.Tensor, class_start: int, seed: int = 0, std: float = DEFAULT_STD) -> torch.Tensor:
    """Fill ``weight`` (C_local, d), the rows of global classes ``[class_start, class_start + C_local)``.

    A meta or fake ``weight`` is returned untouched (there is nothing to fill; see the module doc)."""
    if has_no_data(weight):
        return weight
    rows, d = weight.shape
    end = class_start + rows
    generator = torch.Generator(device=weight.device)
    first, last = class_start // BLOCK_ROWS, (end - 1) // BLOCK_ROWS if rows else -1
    for block in range(first, last + 1):
        b0 = block * BLOCK_ROWS
        lo, hi = max(b0, class_start), min(b0 + BLOCK_ROWS, end)
        generator.manual_seed(_block_seed(seed, block))
        # always the whole block: a generator's output for one position depends on the request size
        values = torch.empty(BLOCK_ROWS, d, device=weight.device, dtype=torch.float32)
        values.normal_(0.0, std, generator=generator)
        weight[lo - class_start: hi - class_start].copy_(values[lo - b0: hi - b0])
    return weight

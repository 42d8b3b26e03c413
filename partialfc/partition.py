"""How the class-weight matrix is split across ranks: pure functions, no torch.distributed.

Rows are split contiguously. With ``C`` classes over ``W`` ranks, rank ``r`` holds
``C // W + (r < C % W)`` classes starting at ``r * (C // W) + min(r, C % W)``: the first
``C % W`` ranks hold one class more. This is the same rule insightface's PartialFC uses, so a
shard produced there lines up with one produced here.
"""
from __future__ import annotations


def _check(num_classes: int, world_size: int) -> None:
    if not isinstance(num_classes, int) or not isinstance(world_size, int):
        raise TypeError(f"num_classes and world_size must be int, got {num_classes!r}, {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes ({num_classes}) must be >= the number of ranks ({world_size}): "
            "every rank needs at least one class")


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Number of classes held by each rank, ``[C_0, ..., C_{W-1}]`` (they sum to ``num_classes``)."""
    _check(num_classes, world_size)
    base, extra = divmod(num_classes, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, class_end)``: rank ``rank`` holds global class ids ``[class_start, class_end)``."""
    _check(num_classes, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def owner_of(class_id: int, num_classes: int, world_size: int) -> int:
    """The rank that holds global class ``class_id`` (inverse of :func:`shard_bounds`)."""
    _check(num_classes, world_size)
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class_id must be in [0, {num_classes}), got {class_id}")
    base, extra = divmod(num_classes, world_size)
    big = extra * (base + 1)  # the first `extra` ranks hold base + 1 classes each
    if class_id < big:
        return class_id // (base + 1)
    return extra + (class_id - big) // base

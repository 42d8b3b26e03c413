"""Gradient-norm clipping over replicated and sharded parameters together.

A model trained with this head has two kinds of parameters: the backbone's, replicated on every
rank (identical gradients after DDP averaging), and the head's, sharded (each rank holds different
rows). The global gradient norm is ``sqrt(|g_replicated|^2 + sum over ranks |g_shard|^2)``: one
all-reduce of one number, after which every rank applies the same clipping factor. No host sync.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .collectives import ProcessGroup, all_reduce_


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _sq_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        values = g.coalesce().values() if g.is_sparse else g
        total = total + values.detach().float().square().sum()
    return total


def clip_grad_norm_(replicated: Iterable[torch.Tensor], sharded: Iterable[torch.Tensor], max_norm: float,
                    group: ProcessGroup = None) -> torch.Tensor:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    ``sharded`` parameters (e.g. ``head.parameters()``) are summed over ``group``; ``replicated``
    ones are counted once. Returns the total norm before clipping (same tensor value on every
    rank; non-finite if any gradient is). Sparse gradients are supported.
    """
    rep, sh = _grads(replicated), _grads(sharded)
    device = (rep + sh)[0].device if rep + sh else torch.device("cpu")
    sharded_sq = all_reduce_(_sq_norm(sh, device), "sum", group)
    total = torch.sqrt(_sq_norm(rep, device) + sharded_sq)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + sh:
        g.mul_(coef.to(g.dtype))  # dense or sparse COO alike
    return total

"""Collectives used by the head, each with an explicit ``group``.

A group of one rank (or ``torch.distributed`` not initialised) makes every function here a
no-op, so the head runs as a plain one-device module without any process group.

``GatherEmbeddings`` is the one collective with an autograd pair:

    forward:  all-gather of (embeddings, labels) from every rank, uneven batch sizes allowed
    backward: reduce-scatter (SUM) of the gathered embedding gradient, times ``grad_scale``

The statistics all-reduces of the loss (MAX of row maxima, SUM of sum-exp / target logit) run
inside the loss Function's forward and need no backward of their own: its backward is written
from the already reduced global softmax (see :mod:`partialfc.softmax`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]

# torch >= 2.13 renames these two; keep working on 2.4+.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when ``group`` (``None``: the default group) spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_size(group: ProcessGroup = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: ProcessGroup = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_gather_rows(x: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Stack equal-shaped ``x`` (k, ...) from every rank: (W * k, ...). No autograd."""
    if not is_distributed(group):
        return x
    out = x.new_empty((group_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_tensor(out, x.contiguous(), group=group)
    return out


def batch_sizes_or_raise(batch: int, ok: bool, what: str, device, group: ProcessGroup = None) -> list[int]:
    """Every rank's batch size, after every rank's input check: one all-gather of (batch, ok) per
    rank, read on the host. When any rank's check failed, every rank raises the same ValueError,
    ``f"{what}; not so on rank(s) [...]"``, instead of the good ranks waiting in a collective the
    bad one never joins."""
    record = torch.tensor([[batch if ok else 0, int(ok)]], dtype=torch.int64, device=device)
    records = all_gather_rows(record, group).tolist()  # (W, 2)
    bad = [r for r, (_, good) in enumerate(records) if not good]
    if bad:
        raise ValueError(f"{what}; not so on rank(s) {bad}")
    return [b for b, _ in records]


def all_gather_uneven(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None) -> torch.Tensor:
    """All ranks' ``x`` (sizes[r], ...) stacked rank-major: (sum(sizes), ...). The rows are padded to
    ``max(sizes)`` for one all-gather and the padding dropped. No autograd."""
    if not is_distributed(group):
        return x
    b_max = max(sizes)
    padded = x.new_zeros((b_max,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_rows(padded, group)
    return torch.cat([gathered[r * b_max: r * b_max + b] for r, b in enumerate(sizes)])


def all_reduce_(x: torch.Tensor, op: str, group: ProcessGroup = None) -> torch.Tensor:
    """In-place all-reduce of ``x`` with ``op`` in {"sum", "max"}; returns ``x``. No autograd."""
    if is_distributed(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return x


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_code(dtype: torch.dtype) -> int:
    """A small int naming a floating dtype, for exchanging it in an int64 record (-1: other)."""
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def dtype_from_code(code: int) -> torch.dtype:
    return _DTYPES[code] if 0 <= code < len(_DTYPES) else torch.float32


def refuse_double_backward(what: str) -> None:
    """Raise inside a backward run with ``create_graph=True`` (grad mode is then on)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"PartialFC: {what} does not support double backward (autograd.grad(..., create_graph=True), e.g. a "
            "gradient penalty through the head): its gradient would silently not depend on the inputs. Compute "
            "the penalty on a path that does not go through the head, or take the first gradient without "
            "create_graph.")


def _labels_as(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 (B,) reinterpreted bit for bit as ``dtype``: (B, 8 // itemsize). No arithmetic."""
    per = 8 // torch.empty((), dtype=dtype).element_size()
    return labels.contiguous().view(dtype).view(-1, per)


class GatherEmbeddings(torch.autograd.Function):
    """forward: all-gather embeddings + labels (one call; labels ride along bit for bit).
    backward: reduce-scatter (SUM) of the embedding gradient, scaled by ``grad_scale``.

    ``sizes[r]`` is rank r's batch size. Uneven sizes are padded to ``max(sizes)`` for the
    collective and the padding is dropped again, so ``x_global`` has exactly ``sum(sizes)`` rows,
    rank-major. Shapes: x_local (B_r, d), labels_local (B_r,) int64 -> x_global (B_global, d),
    labels_global (B_global,).
    """

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, labels_local: torch.Tensor, sizes: Sequence[int],
                group: ProcessGroup, grad_scale: float, anchor: Optional[torch.Tensor] = None):
        # ``anchor``: an empty tensor that requires grad, passed by a rank whose embeddings do not
        # (e.g. an empty batch): it puts this Function in the graph so the rank joins the backward.
        world, d = len(sizes), x_local.shape[1]
        b_max = max(sizes)
        ctx.sizes, ctx.group, ctx.grad_scale, ctx.rank = list(sizes), group, grad_scale, group_rank(group)
        payload = torch.cat([x_local, _labels_as(labels_local, x_local.dtype)], dim=1)  # (B_r, d + k)
        if payload.shape[0] < b_max:
            payload = torch.cat([payload, payload.new_zeros(b_max - payload.shape[0], payload.shape[1])])
        gathered = payload.new_empty(world * b_max, payload.shape[1])
        _all_gather_tensor(gathered, payload, group=group)
        if any(b != b_max for b in sizes):
            gathered = torch.cat([gathered[r * b_max: r * b_max + b] for r, b in enumerate(sizes)])
        x_global = gathered[:, :d].contiguous()
        # clone, not contiguous(): one row is already contiguous, at an offset of d elements that an
        # int64 view cannot start at when d * itemsize is not a multiple of 8
        labels_global = gathered[:, d:].clone(memory_format=torch.contiguous_format).view(torch.int64).view(-1)
        ctx.mark_non_differentiable(labels_global)
        return x_global, labels_global

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor, _grad_labels):
        refuse_double_backward("the embedding all-gather")
        sizes, b_max = ctx.sizes, max(ctx.sizes)
        grad_global = grad_global.contiguous()
        if any(b != b_max for b in sizes):  # back to the padded, rank-major layout
            padded = grad_global.new_zeros(len(sizes) * b_max, grad_global.shape[1])
            offset = 0
            for r, b in enumerate(sizes):
                padded[r * b_max: r * b_max + b] = grad_global[offset: offset + b]
                offset += b
            grad_global = padded
        grad_local = grad_global.new_empty(b_max, grad_global.shape[1])
        _reduce_scatter_tensor(grad_local, grad_global, op=dist.ReduceOp.SUM, group=ctx.group)
        grad_local = grad_local[: sizes[ctx.rank]]
        if ctx.grad_scale != 1:
            grad_local = grad_local * ctx.grad_scale
        return grad_local, None, None, None, None, None


def gather_embeddings(x_local: torch.Tensor, labels_local: torch.Tensor, sizes: Sequence[int],
                      group: ProcessGroup = None, grad_scale: float = 1.0, anchor: Optional[torch.Tensor] = None):
    """``(x_global, labels_global)``; the identity on a single rank. See :class:`GatherEmbeddings`."""
    if not is_distributed(group):
        return x_local, labels_local
    return GatherEmbeddings.apply(x_local, labels_local, tuple(sizes), group, grad_scale, anchor)

"""Sub-center ArcFace's cleaning step (Deng et al., ECCV 2020), for a sharded head with k sub-centers.

A head trained with ``sub_centers=k`` gives every class k rows. Most of a class's clean samples
gather at one of them, the *dominant* sub-center (the one nearest to the most samples of the
class); noisy samples (wrong labels) sit at the others or far from all. The paper's recipe, after
training with k sub-centers: keep only each class's dominant sub-center, list the samples whose
angle to their class's dominant sub-center is above a threshold (75 degrees in the paper) as noise,
drop them, and go on training with one row per class.

    counts = sub_center_counts(head, embeddings, labels)     # collective, per batch; sum them
    dominant = counts.argmax(dim=1)                          # (C_local,): this rank's classes
    angles = angles_to_dominant(head, embeddings, labels, dominant)   # (B_local,) degrees, collective
    clean_head = keep_dominant(head, dominant)               # a new head, sub_centers=1, same classes

or in one call over the local data (every rank passes its own batches, the same number of them):
``clean_sub_centers(head, batches, max_angle=75.0)``.

Every function that takes embeddings is a collective over the head's group: each rank passes its
local rows (any number, empty included); the batch is all-gathered so that the rank holding a
class sees all of that class's samples (one gather of (B, d) plus one (B,) all-reduce per call, none
of C). Runs under ``torch.no_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F

from .collectives import all_gather_uneven, all_reduce_, batch_sizes_or_raise


def _gathered(head, embeddings: torch.Tensor, labels: torch.Tensor):
    """``(x_global (B, d) normalised float32+, labels_global (B,), local slice)`` for this rank's rows."""
    ok = embeddings.dim() == 2 and embeddings.shape[1] == head.embedding_size and labels.dim() == 1 \
        and labels.shape[0] == embeddings.shape[0]
    device = head.weight.device
    sizes = batch_sizes_or_raise(embeddings.shape[0] if embeddings.dim() else 0, ok,  # the one host read
                                 f"sub-center cleaning: embeddings must be (batch, {head.embedding_size}) with one "
                                 "label per row", device, head.group)
    x = embeddings.detach().to(device)
    x = x.to(_dtype(head, x))
    x_global = F.normalize(all_gather_uneven(x, sizes, head.group), dim=1)
    y_global = all_gather_uneven(labels.to(device=device, dtype=torch.int64), sizes, head.group)
    bad_labels = int(((y_global < 0) | (y_global >= head.num_classes)).sum())
    if bad_labels:  # the gathered labels are the same everywhere: so is this error
        raise ValueError(f"sub-center cleaning: {bad_labels} label(s) outside [0, {head.num_classes})")
    start = sum(sizes[:head.rank]) if head.world_size > 1 else 0
    return x_global, y_global, slice(start, start + embeddings.shape[0])


def _dtype(head, x: torch.Tensor) -> torch.dtype:
    """The dtype the cosines are computed in: the inputs' common one, at least float32."""
    return torch.promote_types(torch.promote_types(x.dtype, head.weight.dtype), torch.float32)


def _local_rows(head, y_global: torch.Tensor):
    """``(mask (B,), local class (n,))`` of the gathered rows whose class this rank holds."""
    mine = (y_global >= head.class_start) & (y_global < head.class_end)
    return mine, y_global[mine] - head.class_start


@torch.no_grad()
def sub_center_counts(head, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C_local, k) int64: for each class of this rank and each of its sub-centers, how many samples
    of the class (over every rank's batch) have it as their nearest sub-center. Collective."""
    k = head.sub_centers
    x_global, y_global, _ = _gathered(head, embeddings, labels)
    mine, cls = _local_rows(head, y_global)
    w = F.normalize(head.weight.detach().to(x_global.dtype), dim=1).view(head.num_local, k, -1)  # (C_local, k, d)
    cos = torch.linalg.vecdot(x_global[mine].unsqueeze(1), w[cls])  # (n, k)
    nearest = cos.argmax(dim=1) if cos.numel() else cls  # (n,)
    counts = torch.zeros(head.num_local * k, dtype=torch.int64, device=w.device)
    counts.index_add_(0, cls * k + nearest, torch.ones_like(cls))
    return counts.view(head.num_local, k)


@torch.no_grad()
def angles_to_dominant(head, embeddings: torch.Tensor, labels: torch.Tensor, dominant: torch.Tensor) -> torch.Tensor:
    """(B_local,) float64: the angle in degrees between each local row and its class's dominant
    sub-center (``dominant``: (C_local,) this rank's choice per class). Collective."""
    k = head.sub_centers
    if dominant.shape != (head.num_local,):
        raise ValueError(f"angles_to_dominant: dominant must hold one sub-center per local class "
                         f"({head.num_local},), got {tuple(dominant.shape)}")
    x_global, y_global, local = _gathered(head, embeddings, labels)
    mine, cls = _local_rows(head, y_global)
    rows = cls * k + dominant.to(cls.device)[cls]
    w = F.normalize(head.weight.detach()[rows].to(x_global.dtype), dim=1)  # (n, d)
    cos = torch.zeros(y_global.shape[0], dtype=torch.float64, device=w.device)
    cos[mine] = torch.linalg.vecdot(x_global[mine], w).double()
    all_reduce_(cos, "sum", head.group)  # each row's class is held by exactly one rank
    return torch.rad2deg(torch.acos(cos[local].clamp(-1.0, 1.0)))


@torch.no_grad()
def keep_dominant(head, dominant: torch.Tensor):
    """A new head with one row per class (this rank's classes, the same options and margin, the
    step counter kept) holding each class's dominant sub-center. Not a collective."""
    if dominant.shape != (head.num_local,):
        raise ValueError(f"keep_dominant: dominant must hold one sub-center per local class ({head.num_local},), "
                         f"got {tuple(dominant.shape)}")
    if bool(((dominant < 0) | (dominant >= head.sub_centers)).any()):
        raise ValueError(f"keep_dominant: sub-center indices must be in [0, {head.sub_centers})")
    new = head.__class__(head.embedding_size, head.num_classes, margin=head.margin, sample_rate=head.sample_rate,
                         group=head.group, ignore_index=head.ignore_index, chunk_size=head.chunk_size,
                         sparse_grad=head.sparse_grad, seed=head.seed, validate=head.validate,
                         uniform_batch=head.uniform_batch, embedding_grad_scale=head.embedding_grad_scale,
                         init_std=head.init_std, sub_centers=1, device=head.weight.device, dtype=head.weight.dtype)
    rows = torch.arange(head.num_local, device=head.weight.device) * head.sub_centers + dominant.to(head.weight.device)
    new.weight.copy_(head.weight.detach()[rows])
    new.step = head.step
    new.train(head.training)
    return new


@dataclass
class Cleaning:
    """What :func:`clean_sub_centers` found on this rank."""

    dominant: torch.Tensor  # (C_local,) the dominant sub-center of each local class
    counts: torch.Tensor    # (C_local, k) nearest-sub-center counts over all ranks' data
    outliers: torch.Tensor  # (n,) int64 positions, in this rank's data order, of the samples to drop
    angles: torch.Tensor    # (N_local,) float64 degrees to the class's dominant sub-center
    head: object            # the cleaned head: one row per class


Batches = Union[Iterable, Callable[[], Iterable]]


def clean_sub_centers(head, batches: Batches, max_angle: float = 75.0) -> Cleaning:
    """The paper's cleaning in one call. ``batches``: this rank's data as ``(embeddings, labels)``
    pairs, a sequence (read twice) or a function returning a fresh iterable; every rank must pass the
    same number of batches (a rank with less data passes empty ones). Collective."""
    if not 0 < max_angle <= 180:
        raise ValueError(f"clean_sub_centers: max_angle must be in (0, 180] degrees, got {max_angle}")

    def each() -> Iterable:
        return batches() if callable(batches) else batches

    counts: Optional[torch.Tensor] = None
    for x, y in each():
        c = sub_center_counts(head, x, y)
        counts = c if counts is None else counts + c
    if counts is None:
        raise ValueError("clean_sub_centers: no batches given")
    dominant = counts.argmax(dim=1)  # ties (and classes without samples) take the lowest index
    angles = torch.cat([angles_to_dominant(head, x, y, dominant) for x, y in each()])
    outliers = torch.nonzero(angles > max_angle).squeeze(1)
    return Cleaning(dominant=dominant, counts=counts, outliers=outliers, angles=angles,
                    head=keep_dominant(head, dominant))

"""Partial FC class sampling: which of this rank's classes take part in a step.

Every class of the shard that occurs in the gathered batch (a positive) is kept; the rest of the
sample is drawn uniformly without replacement from the other classes of the shard. Sample size:
``min(C_local, max(ceil(rate * C_local), n_positive))``.

All of it runs on the weights' device with a ``torch.Generator`` seeded from
``(seed, class_start, step)``: the same seed, step and inputs give the same sample, different
shards draw independently, and nothing is copied to the host. The one exception: when
``ceil(rate * C_local) < min(B_global, C_local)`` the positives could outnumber the planned
sample, so the number of positives is read on the host (one sync) to size the sample.
"""
from __future__ import annotations

import math

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to spread seeds apart


def step_seed(seed: int, class_start: int, step: int) -> int:
    """A 63-bit generator seed for one shard and one step."""
    h = (seed * _MIX + class_start) & (2**64 - 1)
    h = (h * _MIX + step) & (2**64 - 1)
    h ^= h >> 31
    return h & (2**63 - 1)


def planned_sample_size(num_local: int, rate: float) -> int:
    return min(num_local, max(1, math.ceil(rate * num_local)))


def sample_classes(target: torch.Tensor, num_local: int, rate: float, generator: torch.Generator) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``(index, target_in_sample)``.

    target: (B,) int64 local row of each row's target class, -1 when not on this shard.
    index: (k,) sorted int64 local rows taking part (all positives + random negatives).
    target_in_sample: (B,) position of each target in ``index``, -1 when not on this shard.
    """
    device = target.device
    owned = target >= 0
    positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device)
    positive[torch.where(owned, target, num_local)] = True  # slot num_local absorbs the others
    positive = positive[:num_local]
    k = planned_sample_size(num_local, rate)
    if k < min(target.shape[0], num_local):  # positives might not fit: size from their count
        k = max(k, int(positive.sum()))
    scores = torch.rand(num_local, generator=generator, device=device)
    scores.masked_fill_(positive, 2.0)  # positives outrank every random score in [0, 1)
    index = torch.topk(scores, k, sorted=False).indices.sort().values
    where_in_sample = torch.full((num_local,), -1, dtype=torch.int64, device=device)
    where_in_sample[index] = torch.arange(k, device=device)
    target_in_sample = torch.where(owned, where_in_sample[target.clamp_min(0)], -1)
    return index, target_in_sample

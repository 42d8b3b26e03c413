"""Sharded top-k prediction: the k classes of largest cosine over all shards, without a margin.

Rank r holds classes [class_start, class_end). For every row of its local batch:

    1. the batch sizes (one tiny all-gather, read on the host) and the embeddings of all ranks
       (one all-gather, uneven sizes padded): x_global (B, d);
    2. cosines against this rank's rows, ``chunk`` classes at a time: (B, chunk) at most, with a
       running top-k per row: candidates (B, k_local);
    3. one all-gather of the candidates (B, k) from every rank, then the merge: the k best over all
       ranks, ties broken by the lower class id; each rank keeps its own rows.

Collectives: 3 all-gathers (sizes, embeddings, candidates), none of them of size C. Runs under ``torch.no_grad``.
"""
from __future__ import annotations

import torch

from .collectives import (ProcessGroup, all_gather_rows, all_gather_uneven, batch_sizes_or_raise, group_rank,
                          group_size, is_distributed)


def _best_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score descending, then id ascending) of each row of (B, n) candidates."""
    order = torch.sort(ids, dim=1, stable=True).indices  # by id first ...
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # ... then by score
    return scores.gather(1, order), ids.gather(1, order)


def local_topk(x_global: torch.Tensor, weight: torch.Tensor, class_start: int, k: int,
               chunk: int = 65536, sub_centers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosines of x_global (B, d) against the classes of ``weight`` (C_local * sub_centers,
    d; a class's cosine is its nearest row's), k <= C_local: float32 scores (B, k) and global class
    ids (B, k), memory (B, chunk * sub_centers)."""
    xhat = torch.nn.functional.normalize(x_global.float(), dim=1)
    best_s = xhat.new_full((xhat.shape[0], 0), float("-inf"))
    best_i = torch.zeros((xhat.shape[0], 0), dtype=torch.int64, device=xhat.device)
    sc = sub_centers
    for c0 in range(0, weight.shape[0] // sc, chunk):
        w = torch.nn.functional.normalize(weight[c0 * sc: (c0 + chunk) * sc].float(), dim=1)
        cos = xhat @ w.t()  # (B, cb * sc)
        if sc > 1:
            cos = cos.view(cos.shape[0], -1, sc).amax(dim=2)  # (B, cb)
        ids = torch.arange(class_start + c0, class_start + c0 + cos.shape[1], device=xhat.device)
        best_s, best_i = _best_k(torch.cat([best_s, cos], 1), torch.cat([best_i, ids.expand_as(cos)], 1), k)
    return best_s, best_i


@torch.no_grad()
def sharded_topk(embeddings: torch.Tensor, weight: torch.Tensor, class_start: int, num_classes: int, k: int,
                 group: ProcessGroup = None, chunk: int = 65536, sub_centers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, class_ids)``: (B_local, k) cosines and global ids of the ``k`` nearest classes over
    every rank of ``group``, best first, ties to the lower class id. ``weight`` holds ``sub_centers``
    rows per class (the class's cosine is the largest). Collective."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"predict: k must be in [1, num_classes={num_classes}], got {k}")
    k_local = min(k, weight.shape[0] // sub_centers)
    ok = embeddings.dim() == 2 and embeddings.shape[1] == weight.shape[1] and embeddings.is_floating_point()
    sizes = batch_sizes_or_raise(embeddings.shape[0] if embeddings.dim() else 0, ok,  # the one host read
                                 f"predict: embeddings must be floating (batch, {weight.shape[1]}) tensors",
                                 weight.device, group)
    if not is_distributed(group):
        return local_topk(embeddings, weight, class_start, k_local, chunk, sub_centers)
    x_global = all_gather_uneven(embeddings, sizes, group)  # (B, d)
    scores, ids = local_topk(x_global, weight, class_start, k_local, chunk, sub_centers)  # (B, k_local)
    if k_local < k:  # a small shard: pad its candidates so every rank sends (B, k)
        pad = k - k_local
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), num_classes)], 1)
    # one all-gather of the candidates: float64 holds the float32 scores and ids < 2**53 exactly
    payload = torch.cat([scores.double(), ids.double()], 1)  # (B, 2k)
    world, rank = group_size(group), group_rank(group)
    gathered = all_gather_rows(payload, group).view(world, -1, 2 * k)  # (W, B, 2k)
    start = sum(sizes[:rank])
    mine = gathered[:, start: start + sizes[rank]].permute(1, 0, 2)  # (B_local, W, 2k)
    cand_s = mine[..., :k].reshape(sizes[rank], world * k).float()
    cand_i = mine[..., k:].reshape(sizes[rank], world * k).long()
    return _best_k(cand_s, cand_i, k)

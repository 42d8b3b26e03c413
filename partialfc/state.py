"""The head's state: which rows a state dict holds, loading it safely, and moving it between layouts.

A head's ``state_dict()`` holds its weight rows and, in ``_extra_state``, the layout they belong to:
an int64 tensor of the fields ``LAYOUT_FIELDS`` (``format``, sampling ``step``, ``num_classes``,
``embedding_size``, ``rows_per_class``, ``class_start``/``class_end``, ``world_size``, ``rank``) — a
tensor, not a dict, so that safetensors (``accelerator.save_state``'s default) can store it;
:func:`read_layout` turns it into a dict. Loading checks that layout first, before anything is copied:

- rows of exactly this rank's classes load as usual;
- a *consolidated* state (all ``num_classes`` rows, written by :func:`consolidate_state_dict`) loads on
  any number of ranks: each rank takes its own rows;
- anything else (another class count, another rank's rows, e.g. a state saved from rank 0 only)
  raises a ``ValueError`` naming both layouts and the way to re-shard (:func:`load_head_shards`).

Frameworks that save from rank 0 only (Lightning's DDP strategy, ``accelerator.save_state``) keep
every shard when the state is consolidated before saving: :func:`consolidate_state_dict` and
:func:`consolidate_optimizer_state` on save, :func:`shard_optimizer_state` on load (see
``examples/lightning_example.py``). They gather all rows to every rank's host memory (C x d): for
heads of tens of millions of classes prefer per-rank shard files (``launch/checkpoint.py``).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from .collectives import all_gather_uneven, group_size
from .partition import shard_sizes

FORMAT = 1
LAYOUT_FIELDS = ("format", "step", "num_classes", "embedding_size", "rows_per_class", "class_start",
                 "class_end", "world_size", "rank")
_LAYOUT_KEYS = ("num_classes", "embedding_size", "class_start", "class_end")


def is_dtensor(value) -> bool:
    cls = type(value)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def layout(head) -> dict:
    """The rows a head holds and its sampling step, as a dict of ``LAYOUT_FIELDS``."""
    return {"format": FORMAT, "step": head.step, "num_classes": head.num_classes,
            "embedding_size": head.embedding_size, "rows_per_class": head.sub_centers,
            "class_start": head.class_start, "class_end": head.class_end,
            "world_size": head.world_size, "rank": head.rank}


def layout_tensor(meta: dict) -> torch.Tensor:
    """The ``_extra_state`` form of a layout: int64 (len(LAYOUT_FIELDS),) on the CPU."""
    return torch.tensor([int(meta[k]) for k in LAYOUT_FIELDS], dtype=torch.int64)


def read_layout(extra) -> Optional[dict]:
    """A layout dict from an ``_extra_state`` (tensor, or a dict of older versions); ``None`` when it
    names no rows (states written before the layout was saved hold only ``{"step": n}``)."""
    if torch.is_tensor(extra) and extra.numel() == len(LAYOUT_FIELDS):
        return dict(zip(LAYOUT_FIELDS, extra.tolist()))
    if isinstance(extra, dict):
        return dict(extra) if all(k in extra for k in _LAYOUT_KEYS) else None
    return None


def step_of(extra) -> int:
    meta = read_layout(extra)
    return int(meta["step"] if meta is not None else extra["step"])


def _describe(meta: dict) -> str:
    k = meta.get("rows_per_class", 1)
    return (f"classes [{meta['class_start']}, {meta['class_end']}) of {meta['num_classes']} "
            f"(rank {meta.get('rank', '?')} of {meta.get('world_size', '?')}, embedding size {meta['embedding_size']}"
            + (f", {k} sub-centers per class" if k != 1 else "") + ")")


def select_rows(head, state: dict, prefix: str) -> None:
    """Check the layout of ``state`` (the head's entries, a dict the caller does not own) against
    ``head`` and leave in ``state[prefix + "weight"]`` exactly this rank's rows; raise otherwise."""
    weight = state.get(prefix + "weight")
    meta = read_layout(state.get(prefix + "_extra_state"))
    if weight is None:
        return  # reported as a missing key by the module's loader
    if meta is None:  # written before the layout was saved
        if weight.shape[0] != head.num_rows:
            raise ValueError(f"PartialFC.load_state_dict: '{prefix}weight' has {weight.shape[0]} rows, this rank "
                             f"holds {head.num_rows} (classes [{head.class_start}, {head.class_end})); the state "
                             "dict names no layout, so it cannot be re-sharded")
        return
    here = layout(head)
    problem = None
    k = head.sub_centers
    if meta["num_classes"] != head.num_classes or meta["embedding_size"] != head.embedding_size \
            or meta.get("rows_per_class", 1) != k:
        problem = "it belongs to another head"
    elif weight.shape[0] != (meta["class_end"] - meta["class_start"]) * k:
        problem = f"its weight has {weight.shape[0]} rows, not the {(meta['class_end'] - meta['class_start']) * k} it names"
    elif (meta["class_start"], meta["class_end"]) == (head.class_start, head.class_end):
        return
    elif (meta["class_start"], meta["class_end"]) == (0, head.num_classes):
        state[prefix + "weight"] = weight[head.class_start * k: head.class_end * k]  # consolidated: take our rows
        return
    else:
        problem = "it holds other classes' rows (a state saved from one rank only keeps only that rank's classes)"
    raise ValueError(
        f"PartialFC.load_state_dict: the state dict holds {_describe(meta)}; this head holds {_describe(here)}: "
        f"{problem}. To move a head between layouts, load every rank's state with "
        "partialfc.load_head_shards(head, [state_rank0, state_rank1, ...]), or save a consolidated state "
        "(partialfc.consolidate_state_dict) that loads on any number of ranks.")


def load_head_shards(head, shards: Iterable[dict], prefix: str = "") -> None:
    """Re-shard: fill ``head`` from the state dicts of all ranks of another layout (same classes).

    Each element is one rank's state dict (``prefix + "weight"`` and ``prefix + "_extra_state"``, as
    written by ``state_dict()``; memory-mapped loads work, only overlapping rows are read). Every row
    of this rank must be covered; the step counter is taken from the shards.
    """
    covered = torch.zeros(head.num_local, dtype=torch.bool)
    step = None
    k = head.sub_centers
    with torch.no_grad():
        for shard in shards:
            meta, weight = read_layout(shard[prefix + "_extra_state"]), shard[prefix + "weight"]
            if meta is None:
                raise ValueError("load_head_shards: a shard's state names no layout (written by an older version)")
            if meta["num_classes"] != head.num_classes or meta["embedding_size"] != head.embedding_size \
                    or meta.get("rows_per_class", 1) != k:
                raise ValueError(f"load_head_shards: a shard holds {_describe(meta)}, the head has "
                                 f"{head.num_classes} classes x {head.embedding_size}"
                                 + (f" with {k} sub-centers per class" if k != 1 else ""))
            lo, hi = max(meta["class_start"], head.class_start), min(meta["class_end"], head.class_end)
            step = meta["step"] if step is None else step
            if lo < hi:
                rows = weight[(lo - meta["class_start"]) * k: (hi - meta["class_start"]) * k]
                head.weight[(lo - head.class_start) * k: (hi - head.class_start) * k].copy_(rows)
                covered[lo - head.class_start: hi - head.class_start] = True
    if not bool(covered.all()):
        missing = int((~covered).sum())
        raise ValueError(f"load_head_shards: {missing} of this rank's {head.num_local} classes' rows "
                         f"(classes [{head.class_start}, {head.class_end})) are in none of the shards given")
    head.step = int(step)


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(state-dict prefix, head)`` for every head inside ``model``."""
    from .head import PartialFC
    return [(f"{name}." if name else "", m) for name, m in model.named_modules() if isinstance(m, PartialFC)]


def gather_rows(head, rows: torch.Tensor) -> torch.Tensor:
    """Collective over the head's group: this rank's ``rows`` (C_local k, ...) -> all classes' (C k, ...)
    on CPU (k = sub-centers per class)."""
    sizes = [n * head.sub_centers for n in shard_sizes(head.num_classes, group_size(head.group))]
    return all_gather_uneven(rows.detach(), sizes, head.group).cpu()


def consolidate_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict:
    """Collective (every rank calls it): a new state dict of ``model`` in which every head holds all
    ``num_classes`` rows. Loads on any number of ranks; safe to save from rank 0 only."""
    out = dict(model.state_dict() if state_dict is None else state_dict)
    for prefix, head in head_modules(model):
        out[prefix + "weight"] = gather_rows(head, head.weight)
        out[prefix + "_extra_state"] = layout_tensor({**layout(head), "class_start": 0,
                                                      "class_end": head.num_classes, "world_size": 1, "rank": 0})
    return out


def _head_param_indices(model: nn.Module, optimizer) -> list[tuple[int, nn.Module, torch.Tensor]]:
    """``(index in the optimizer's state dict, head, parameter)`` for every head parameter it steps.

    ``optimizer``: the optimizer, or its parameters in order (e.g. before the optimizer exists)."""
    heads = {id(p): (h, p) for _, h in head_modules(model) for p in h.parameters()}
    if hasattr(optimizer, "param_groups"):
        params = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        params = [p for item in optimizer for p in (item["params"] if isinstance(item, dict) else [item])]
    return [(i, *heads[id(p)]) for i, p in enumerate(params) if id(p) in heads]


def consolidate_optimizer_state(model: nn.Module, optimizer, state: Optional[dict] = None) -> dict:
    """Collective: a copy of ``optimizer``'s state dict whose per-row tensors of head parameters
    (momentum, Adam moments, SparseSGD row flags) hold all classes' rows."""
    state = optimizer.state_dict() if state is None else state
    out = {**state, "state": dict(state["state"])}
    for index, head, _ in _head_param_indices(model, optimizer):
        entry = state["state"].get(index, {})
        out["state"][index] = {k: gather_rows(head, v) if _per_row(v, head.num_rows) else v
                               for k, v in entry.items()}
    return out


def shard_optimizer_state(model: nn.Module, optimizer, state: dict) -> dict:
    """The inverse on load: a copy of a consolidated optimizer state dict with this rank's rows only.

    ``optimizer`` may also be the list of parameters (or param-group dicts) in the optimizer's order."""
    out = {**state, "state": dict(state["state"])}
    for index, head, _ in _head_param_indices(model, optimizer):
        entry = state["state"].get(index)
        if entry is None or head.num_classes == head.num_local:
            continue
        rows = head.num_classes * head.sub_centers
        out["state"][index] = {k: v[head.row_start: head.row_start + head.num_rows] if _per_row(v, rows) else v
                               for k, v in entry.items()}
    return out


def _per_row(value: Any, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows


class OptimizerCheckpoint:
    """An optimizer's state with every head's rows, for checkpointing that saves from rank 0 only.

    ``state_dict()`` is collective (every rank calls it; rank 0's copy holds all rows) and
    ``load_state_dict`` loads this rank's rows into ``optimizer``. Register it with a framework's
    custom-object checkpointing, e.g. ``accelerator.register_for_checkpointing`` (see
    :func:`keep_all_shards_in_accelerate`).
    """

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return consolidate_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(shard_optimizer_state(self.model, self.optimizer, state))


def keep_all_shards_in_accelerate(accelerator, model: nn.Module, optimizer) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` keep every rank's head rows and per-row
    optimizer state. Accelerate writes model and optimizer from rank 0 only: a save-state pre-hook
    consolidates the heads' rows in the saved weights, and an :class:`OptimizerCheckpoint` registered
    for checkpointing (loaded after the optimizer) restores each rank's own optimizer rows."""
    def consolidate_weights(models, weights, output_dir):
        for i, m in enumerate(models):
            weights[i] = consolidate_state_dict(m, weights[i])

    accelerator.register_save_state_pre_hook(consolidate_weights)
    accelerator.register_for_checkpointing(OptimizerCheckpoint(model, optimizer))

"""Checkpoints that resume exactly, survive a crash mid-save and re-shard the head.

Layout of one checkpoint, ``<root>/step_00001000/``::

    meta.json           step, world size, num_classes, every rank's [class_start, class_end), config
    backbone.pt         (rank 0) the unwrapped backbone's state_dict — all that export/evaluate need
    trainer.pt          (rank 0) backbone optimizer, LR scheduler, grad scaler, sampler position,
                        step/epoch, history
    head_rank{r}.pt     (rank r) its weight rows, the head's step counter, the head optimizer's
                        per-row state (momentum, Adam moments, SparseSGD row flags), RNG states

Crash safety: every file is written under ``step_XXXXXXXX.tmp/`` (each via a temporary name and
``os.replace``); only when every rank has finished does rank 0 write ``meta.json`` and rename the
folder to its final name — an atomic step. A crash at any earlier point leaves a ``.tmp`` folder
that :func:`latest_checkpoint` never returns and the next save removes.

Re-sharding: a run saved on W ranks can resume on W' ranks. Each new rank reads, from the old
shard files that overlap its new class range, only those rows (files are memory-mapped), for the
weights and for every per-row optimizer tensor. We do not use ``torch.distributed.checkpoint``
here: it re-shards DTensors, whose ``Shard(0)`` layout splits rows like ``torch.chunk`` (the last
ranks get fewer), while the head keeps insightface-compatible shards (the *first* ``C % W`` ranks
get one more); describing our layout to it would need the deprecated ShardedTensor. Row ranges
and overlap reads are simple, need no collective and are plain files any tool can read.

Every file is loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from partialfc.collectives import group_rank, group_size, is_distributed

_PREFIX = "step_"


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _load(path: Path, mmap: bool = False) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_dirs(root: Path | str) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and not p.name.endswith(".tmp")
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: Path | str) -> Optional[Path]:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path | str, step: int, *, backbone: torch.nn.Module, head, backbone_optimizer,
                    head_optimizer, trainer_state: dict, config: dict, keep: int = 3) -> Path:
    """Collective: every rank of the head's group calls it. Returns the final folder."""
    root = Path(root)
    rank, world = group_rank(), group_size()
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    head_state = {
        "class_start": head.class_start, "class_end": head.class_end,
        "weight": head.weight.detach().cpu(), "head_step": head.step,
        "optimizer_state": {k: (v.cpu() if torch.is_tensor(v) else v)
                            for k, v in head_optimizer.state_dict()["state"].get(0, {}).items()},
        "optimizer_param_groups": head_optimizer.state_dict()["param_groups"],
        "rng": _rng_state(),
    }
    _atomic_torch_save(head_state, tmp / f"head_rank{rank}.pt")
    if rank == 0:
        _atomic_torch_save(backbone.state_dict(), tmp / "backbone.pt")
        _atomic_torch_save({"backbone_optimizer": backbone_optimizer.state_dict(), **trainer_state},
                           tmp / "trainer.pt")
    shards = [None] * world
    if is_distributed():
        dist.all_gather_object(shards, [head.class_start, head.class_end])
    else:
        shards = [[head.class_start, head.class_end]]
    _barrier()  # every rank's files are in place
    if rank == 0:
        meta = {"step": step, "world_size": world, "num_classes": head.num_classes,
                "embedding_size": head.embedding_size, "shards": shards, "config": config}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: Path | str) -> dict:
    with open(Path(path) / "meta.json") as f:
        return json.load(f)


def _reshard_rows(path: Path, meta: dict, start: int, end: int, weight: torch.Tensor):
    """This rank's rows [start, end) of the weight and of every per-row optimizer tensor."""
    rows = end - start
    new_weight = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
    opt_state: dict[str, Any] = {}
    param_groups = None
    for old_rank, (s, e) in enumerate(meta["shards"]):
        lo, hi = max(s, start), min(e, end)
        if lo >= hi and old_rank != 0:  # shard 0 is always read: it carries the param groups
            continue
        shard = _load(path / f"head_rank{old_rank}.pt", mmap=True)
        param_groups = param_groups or shard["optimizer_param_groups"]
        for key, value in shard["optimizer_state"].items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == e - s:
                if key not in opt_state:
                    opt_state[key] = torch.zeros((rows,) + tuple(value.shape[1:]), dtype=value.dtype)
                if lo < hi:
                    opt_state[key][lo - start: hi - start] = value[lo - s: hi - s]
            elif key not in opt_state:
                opt_state[key] = value  # per-tensor scalars (e.g. Adam's step) are equal on all ranks
        if lo < hi:
            new_weight[lo - start: hi - start] = shard["weight"][lo - s: hi - s]
    return new_weight, opt_state, param_groups


def load_checkpoint(path: Path | str, *, backbone: torch.nn.Module, head, backbone_optimizer=None,
                    head_optimizer=None) -> dict:
    """Restore into already-built objects (any world size); returns the trainer state dict."""
    path = Path(path)
    meta = read_meta(path)
    if meta["num_classes"] != head.num_classes or meta["embedding_size"] != head.embedding_size:
        raise ValueError(f"checkpoint {path} has {meta['num_classes']} classes x {meta['embedding_size']}, "
                         f"the head {head.num_classes} x {head.embedding_size}")
    backbone.load_state_dict(_load(path / "backbone.pt"))
    trainer = _load(path / "trainer.pt")
    if backbone_optimizer is not None:
        backbone_optimizer.load_state_dict(trainer.pop("backbone_optimizer"))
    same_layout = meta["world_size"] == group_size() and \
        meta["shards"][group_rank()] == [head.class_start, head.class_end]
    weight, opt_state, param_groups = _reshard_rows(path, meta, head.class_start, head.class_end, head.weight)
    with torch.no_grad():
        head.weight.copy_(weight)
    own = _load(path / f"head_rank{group_rank() if same_layout else 0}.pt", mmap=True)
    head.step = int(own["head_step"])
    if head_optimizer is not None:
        device = head.weight.device
        state = {k: (v.to(device) if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in opt_state.items()}
        head_optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": param_groups})
    if same_layout:
        _set_rng_state(own["rng"])
    trainer["resharded_from"] = None if same_layout else meta["world_size"]
    return trainer


def load_backbone(checkpoint_dir: Path | str, map_location: str = "cpu"):
    """``(backbone, config)`` from a checkpoint folder, for evaluation and export (no process group)."""
    from launch.config import TrainConfig
    from launch.models import build_backbone

    path = Path(checkpoint_dir)
    config = TrainConfig.from_dict(read_meta(path)["config"])
    backbone = build_backbone(config.model.backbone, config.model.embedding_size,
                              config.data.in_channels, config.data.image_size)
    backbone.load_state_dict(_load(path / "backbone.pt"))
    return backbone.to(map_location).eval(), config

"""Checkpoints that resume exactly, survive a crash mid-save and re-shard the head.

Layout of one checkpoint, ``<root>/step_00001000/``::

    meta.json           step, world size, num_classes, every rank's [class_start, class_end), config,
                        "digest": "crc32" and "files": {name: {"size", "crc32"}} for every file below
    backbone.pt         (rank 0) the unwrapped backbone's state_dict — all that export/evaluate need
    trainer.pt          (rank 0) backbone optimizer, LR scheduler, grad scaler, sampler position,
                        step/epoch, history
    head_rank{r}.pt     (rank r) its weight rows, the head's step counter, the head optimizer's
                        state for the weight (per-row: momentum, Adam moments, SparseSGD row flags;
                        see :func:`_per_row`) and the weight's index in it, its other entries, RNG states

Crash safety: every file is written under ``step_XXXXXXXX.tmp/`` (each via a temporary name and
``os.replace``); only when every rank has finished does rank 0 write ``meta.json`` and rename the
folder to its final name — an atomic step. A crash at any earlier point leaves a ``.tmp`` folder
that :func:`latest_checkpoint` never returns and the next save removes. Each file is fsynced
before its rename, so the commit cannot outrun the data it commits.

Integrity: ``meta.json`` records every file's size and CRC-32 (``"files"``), computed while the
file is written. CRC-32 (``zlib.crc32``, streamed) rather than SHA-256: the threat is accidental
damage (truncation, a bad sector, a partial copy), which the size plus a 32-bit CRC catch (a CRC
detects every burst error up to 32 bits; anything else slips through with odds 2**-32); it is
faster (1.4 vs 1.1 GB/s here with SHA-NI, ~3x without), and tampering is out of scope: a hostile
writer could rewrite ``meta.json`` too, and ``weights_only`` loading already keeps a checkpoint
from running code. :func:`resolve_resume` / :func:`verify_checkpoint` check, on every rank, the
files that rank will read, and the ranks agree on one verdict. Checkpoints written before digests
were recorded still load; for them only that each file exists and is a complete zip archive (its
central directory, at the very end, is intact: catches truncation) is checked.

Re-sharding: a run saved on W ranks can resume on W' ranks. Each new rank reads, from the old
shard files that overlap its new class range, only those rows (files are memory-mapped), for the
weights and for every per-row optimizer tensor. We do not use ``torch.distributed.checkpoint``
here: it re-shards DTensors, whose ``Shard(0)`` layout splits rows like ``torch.chunk`` (the last
ranks get fewer), while the head keeps insightface-compatible shards (the *first* ``C % W`` ranks
get one more); describing our layout to it would need the deprecated ShardedTensor. Row ranges
and overlap reads are simple, need no collective and are plain files any tool can read.

Every file is loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code.

Weights only: a checkpoint whose ``trainer.pt`` has no ``backbone_optimizer`` and whose head files
have no ``optimizer_*`` entries or ``rng`` (one written by :mod:`launch.import_insightface`) loads
the weights and leaves both optimizers and the RNG states as the resuming run built them (fresh).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from partialfc.collectives import group_rank, group_size, is_distributed
from partialfc.partition import shard_bounds

log = logging.getLogger(__name__)

_PREFIX = "step_"
_CHUNK = 8 << 20


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class _DigestingWriter:
    """A file object for ``torch.save`` that keeps the size and CRC-32 of the bytes written."""

    def __init__(self, f):
        self.f, self.size, self.crc = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _digest(size: int, crc: int) -> dict:
    return {"size": size, "crc32": f"{crc:08x}"}


def _atomic_torch_save(obj: Any, path: Path) -> dict:
    """Save via a temporary name, fsync, rename; returns the file's :func:`file_digest`."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        out = _DigestingWriter(f)
        torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return _digest(out.size, out.crc)


def file_digest(path: Path | str) -> dict:
    """``{"size": bytes, "crc32": "8 hex digits"}`` of a file, read in 8 MiB chunks."""
    crc, size, buf = 0, 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc, size = zlib.crc32(view[:n], crc), size + n
    return _digest(size, crc)


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


def _cpu(entry: dict) -> dict:
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in entry.items()}


def _weight_index(optimizer, weight: torch.Tensor) -> int:
    """Index of ``weight`` in ``optimizer``'s state dict: its position, by identity, in the
    concatenated ``params`` of its param groups (how ``Optimizer.state_dict`` numbers them)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if param is weight:
            return index
    raise ValueError("the head optimizer does not step head.weight (not in any of its param groups)")


def _head_state(head, head_optimizer) -> dict:
    """What ``head_rank{r}.pt`` holds: the rows, the head weight's optimizer state (``optimizer_state``,
    found by identity), the optimizer's other entries as they are, its param groups and RNG states."""
    opt = head_optimizer.state_dict()
    index = _weight_index(head_optimizer, head.weight)
    return {
        "class_start": head.class_start, "class_end": head.class_end,
        "weight": head.weight.detach().cpu(), "head_step": head.step,
        # a margin with running statistics (AdaFace, CurricularFace): the same on every rank
        "margin_state": _cpu(head.margin.state_dict()) if isinstance(head.margin, torch.nn.Module) else {},
        "optimizer_state": _cpu(opt["state"].get(index, {})),
        "optimizer_weight_index": index,
        "optimizer_other_state": {i: _cpu(v) for i, v in opt["state"].items() if i != index},
        "optimizer_param_groups": opt["param_groups"],
        "rng": _rng_state(),
    }


def _commit(root: Path, tmp: Path, final: Path, meta: dict, keep: int) -> None:
    """Rank 0, once every rank's files are in place: write meta.json, rename, prune old ones."""
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


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
    files = {f"head_rank{rank}.pt": _atomic_torch_save(_head_state(head, head_optimizer),
                                                       tmp / f"head_rank{rank}.pt")}
    if rank == 0:
        files["backbone.pt"] = _atomic_torch_save(backbone.state_dict(), tmp / "backbone.pt")
        files["trainer.pt"] = _atomic_torch_save({"backbone_optimizer": backbone_optimizer.state_dict(),
                                                  **trainer_state}, tmp / "trainer.pt")
    gathered = [None] * world
    mine = [head.class_start, head.class_end, files]
    if is_distributed():
        dist.all_gather_object(gathered, mine)  # also the barrier: every rank's files are in place
    else:
        gathered = [mine]
    if rank == 0:
        meta = {"step": step, "world_size": world, "num_classes": head.num_classes,
                "embedding_size": head.embedding_size, "sub_centers": head.sub_centers,
                "shards": [[s, e] for s, e, _ in gathered],
                "config": config, "digest": "crc32",
                "files": dict(sorted((k, v) for _, _, f in gathered for k, v in f.items()))}
        _commit(root, tmp, final, meta, keep)
    _barrier()
    return final


def read_meta(path: Path | str) -> dict:
    with open(Path(path) / "meta.json") as f:
        return json.load(f)


def _per_row(value: Any, weight_shape: torch.Size) -> bool:
    """The rule for which optimizer tensors of the head weight are split by class rows: those with
    the weight's shape ``(rows, d)`` (momentum, Adam moments), a row vector ``(rows,)`` (SparseSGD's
    ``row_initialized``) or a row column ``(rows, 1)`` (Adafactor's row factor). Anything else
    (Adam's scalar ``step``, Adafactor's ``(1, d)`` column factor) is per tensor, taken from shard 0.
    Only the shapes' coincidence can fool it: a per-tensor ``(d,)`` state on a shard of ``d`` rows."""
    rows = weight_shape[0]
    return torch.is_tensor(value) and tuple(value.shape) in {tuple(weight_shape), (rows,), (rows, 1)}


def _reshard_rows(path: Path, meta: dict, start: int, end: int, weight: torch.Tensor):
    """This rank's classes [start, end): their rows of the weight and of every per-row optimizer
    tensor (``sub_centers`` consecutive rows per class)."""
    k = int(meta.get("sub_centers", 1))
    start, end = start * k, end * k
    rows = end - start
    new_weight = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
    opt_state: dict[str, Any] = {}
    param_groups = None
    for old_rank, (s, e) in enumerate(meta["shards"]):
        s, e = s * k, e * k
        lo, hi = max(s, start), min(e, end)
        if lo >= hi and old_rank != 0:  # shard 0 is always read: it carries the param groups
            continue
        shard = _load(path / f"head_rank{old_rank}.pt", mmap=True)
        param_groups = param_groups or shard.get("optimizer_param_groups")  # absent: weights only
        for key, value in shard.get("optimizer_state", {}).items():
            if _per_row(value, shard["weight"].shape):
                if key not in opt_state:
                    opt_state[key] = torch.zeros((rows,) + tuple(value.shape[1:]), dtype=value.dtype)
                if lo < hi:
                    opt_state[key][lo - start: hi - start] = value[lo - s: hi - s]
            elif key not in opt_state:
                opt_state[key] = value  # per-tensor scalars (e.g. Adam's step) are equal on all ranks
        if lo < hi:
            new_weight[lo - start: hi - start] = shard["weight"][lo - s: hi - s]
    return new_weight, opt_state, param_groups


def _load_head_optimizer(head_optimizer, head, own: dict, opt_state: dict, param_groups) -> None:
    """Load the re-sharded weight state at the weight's saved index, other entries as saved (0 and
    none in checkpoints older than ``optimizer_weight_index``)."""
    index = int(own.get("optimizer_weight_index", 0))
    if _weight_index(head_optimizer, head.weight) != index:
        raise ValueError(f"head.weight is parameter {_weight_index(head_optimizer, head.weight)} of the head "
                         f"optimizer but was parameter {index} when the checkpoint was saved")
    device = head.weight.device
    state = {k: (v.to(device) if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in opt_state.items()}
    entries = {int(i): v for i, v in own.get("optimizer_other_state", {}).items()}
    if state:
        entries[index] = state
    head_optimizer.load_state_dict({"state": entries, "param_groups": param_groups})


def load_checkpoint(path: Path | str, *, backbone: torch.nn.Module, head, backbone_optimizer=None,
                    head_optimizer=None) -> dict:
    """Restore into already-built objects (any world size); returns the trainer state dict.

    Does not verify the files: pick ``path`` with :func:`resolve_resume`, which does."""
    path = Path(path)
    meta = read_meta(path)
    if meta["num_classes"] != head.num_classes or meta["embedding_size"] != head.embedding_size \
            or int(meta.get("sub_centers", 1)) != head.sub_centers:
        raise ValueError(f"checkpoint {path} has {meta['num_classes']} classes x {meta['embedding_size']} with "
                         f"{meta.get('sub_centers', 1)} sub-center(s) per class, the head {head.num_classes} x "
                         f"{head.embedding_size} with {head.sub_centers}")
    backbone.load_state_dict(_load(path / "backbone.pt"))
    trainer = _load(path / "trainer.pt")
    if "backbone_optimizer" not in trainer:
        log.info("checkpoint %s holds no optimizer state (weights only): the optimizers start fresh", path)
    elif backbone_optimizer is not None:
        backbone_optimizer.load_state_dict(trainer.pop("backbone_optimizer"))
    same_layout = meta["world_size"] == group_size() and \
        meta["shards"][group_rank()] == [head.class_start, head.class_end]
    weight, opt_state, param_groups = _reshard_rows(path, meta, head.class_start, head.class_end, head.weight)
    with torch.no_grad():
        head.weight.copy_(weight)
    own = _load(path / f"head_rank{group_rank() if same_layout else 0}.pt", mmap=True)
    head.step = int(own["head_step"])
    if own.get("margin_state") and isinstance(head.margin, torch.nn.Module):
        head.margin.load_state_dict(own["margin_state"])
    if head_optimizer is not None and param_groups is not None:  # None: weights only, fresh optimizer
        _load_head_optimizer(head_optimizer, head, own, opt_state, param_groups)
    if same_layout and "rng" in own:
        _set_rng_state(own["rng"])
    trainer["resharded_from"] = None if same_layout else meta["world_size"]
    return trainer


def _files_to_read(meta: dict, start: int, end: int) -> list[str]:
    """The files :func:`load_checkpoint` opens on a rank that will hold classes [start, end)."""
    heads = {0} | {r for r, (s, e) in enumerate(meta["shards"]) if max(s, start) < min(e, end)}
    return ["backbone.pt", "trainer.pt"] + [f"head_rank{r}.pt" for r in sorted(heads)]


def _new_bounds(meta: dict, head) -> tuple[int, int]:
    """This rank's class range after resuming: the head's, else the default partition."""
    if head is not None:
        return head.class_start, head.class_end
    try:
        return shard_bounds(meta["num_classes"], group_size(), group_rank())
    except ValueError:  # more ranks than classes: loading will refuse; check every head file
        return 0, meta["num_classes"]


def _check_file(path: Path, recorded: Optional[dict]) -> Optional[str]:
    """Why ``path`` is not the file recorded at save time; None when it is. Without a record,
    only that it exists and its zip directory (at the end of the file) is readable."""
    if not path.is_file():
        return f"{path.name}: missing"
    if recorded is None:
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{path.name}: not a complete torch.save archive ({e})"
        return None
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{path.name}: {size} bytes, {recorded['size']} recorded at save (truncated or overwritten)"
    crc = file_digest(path)["crc32"]
    if crc != recorded["crc32"]:
        return f"{path.name}: CRC-32 {crc}, {recorded['crc32']} recorded at save (contents damaged)"
    return None


def _local_problems(path: Path, head) -> list[str]:
    """This rank's findings about the files it would read from checkpoint ``path``."""
    try:
        meta = read_meta(path)
        names = _files_to_read(meta, *_new_bounds(meta, head))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"meta.json: unreadable ({type(e).__name__}: {e})"]
    recorded = meta.get("files")
    if recorded is None:
        log.warning("checkpoint %s records no file digests (saved by an older version): only checking "
                    "that its files exist and are complete archives", path)
    problems = [_check_file(path / n, None if recorded is None else recorded.get(n)) for n in names]
    return [p for p in problems if p]


def _agree(problems: list[str]) -> list[str]:
    """Every rank's problems, merged in the same order on every rank (collective when distributed)."""
    if is_distributed():
        gathered = [None] * group_size()
        dist.all_gather_object(gathered, problems)
        problems = [p for ps in gathered for p in ps]
    return sorted(set(problems))


def verify_checkpoint(path: Path | str, head=None) -> list[str]:
    """Collective: what is wrong with checkpoint ``path``, the same list on every rank (empty: intact).

    Each rank checks the files it would read (``head``: its class range; default: the standard
    partition over the current world), sizes and CRC-32 against ``meta.json``."""
    return _agree(_local_problems(Path(path), head))


def _agreed_checkpoint_dirs(root: Path | str) -> list[Path]:
    """:func:`checkpoint_dirs` as rank 0 sees it, so every rank walks the same candidates."""
    names = [p.name for p in checkpoint_dirs(root)]
    if is_distributed():
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    return [Path(root) / n for n in names]


def resolve_resume(root: Path | str, resume: Optional[str | Path], head=None) -> Optional[Path]:
    """Collective: the checkpoint to resume from, the same on every rank, verified intact.

    ``resume``: None/"" -> None (fresh start); "auto" -> the newest intact checkpoint under
    ``root`` (corrupt ones are skipped with a warning naming the file; None when there are none;
    ValueError when all are corrupt); a path -> that checkpoint, or ValueError naming the bad files."""
    if not resume:
        return None
    if str(resume) != "auto":
        problems = verify_checkpoint(resume, head)
        if problems:
            raise ValueError(f"checkpoint {resume} is corrupt or incomplete: {'; '.join(problems)}")
        return Path(resume)
    candidates = _agreed_checkpoint_dirs(root)
    for path in reversed(candidates):
        problems = verify_checkpoint(path, head)
        if not problems:
            return path
        log.warning("resume=auto: skipping corrupt checkpoint %s (%s); trying the previous one",
                    path, "; ".join(problems))
    if candidates:
        raise ValueError(f"resume=auto: all {len(candidates)} checkpoints under {root} are corrupt; "
                         "move them away (or set resume to null) to start over")
    return None


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

"""Import a model trained with insightface's ``arcface_torch`` as a checkpoint of this project.

    python -m launch.import_insightface --backbone model.pt --arch r50|r100 --num-classes N \\
        --config RUN.yaml --output DIR [--fc checkpoint_gpu_0.pt checkpoint_gpu_1.pt ...] \\
        [--add-classes K [--init id|mean]] [--section.key value ...]

``DIR`` is then a checkpoint folder (step 0) that ``launch.train --config RUN.yaml --train.resume DIR``
fine-tunes on any number of ranks, and that ``launch.evaluate`` / ``launch.export --checkpoint DIR``
read like any other.

What insightface writes (``recognition/arcface_torch/train_v2.py``):

- ``model.pt``: rank 0 saves the unwrapped backbone's ``state_dict()``. Published backbones are such
  plain state dicts, some with every key prefixed ``module.`` (saved from the DDP wrapper); both are
  accepted, and so is a ``checkpoint_gpu_0.pt`` (its ``state_dict_backbone`` is used). Their iResNet
  has the parameter names and shapes of :mod:`launch.models.iresnet` (3 x 112 x 112 input, ``fc``
  512*7*7 -> d), which loads the state dict strictly: a missing, unexpected or mis-shaped entry is an
  error that lists the first few and, when the stage depths match another depth, names it.
- ``checkpoint_gpu_{rank}.pt`` (with ``save_all_states``): one per GPU, a dict whose
  ``state_dict_softmax_fc`` holds ``weight`` (num_local, d), the rows of that rank's classes under
  the shard rule this project also uses (rank r of W: C//W + (r < C%W) rows from C//W*r + min(r, C%W)),
  next to ``epoch``, ``global_step``, the backbone, optimizer and LR-scheduler states (ignored here).
  The older ``rank_{rank}_softmax_weight.pt`` files (a bare weight tensor) are accepted too. The
  files must be given in rank order (the number in each name); their rows are concatenated and must
  add up to ``--num-classes`` exactly (the error says by how much they do not), and each file must
  hold its rank's share of them.

What is written: :mod:`launch.checkpoint`'s layout with step 0, the head re-sharded over as many ranks
as there were ``--fc`` files (``launch.train`` re-shards it again to its own world size), ``meta.json``
with the run config and CRC-32 digests. It holds *weights only*: no optimizer state (both optimizers
start fresh, with the run's own learning rates), no RNG state, fresh LR schedules, grad scaler and
sampler position (the sampler's state needs the training set's size, hence ``--config``).

``--config``: the run config of the fine-tuning (what ``launch.train`` will get); it is recorded in
the checkpoint for ``launch.evaluate`` / ``launch.export``. Its ``model.backbone`` must be ``--arch``,
``model.embedding_size`` the backbone's (512), ``data.in_channels`` 3, ``data.image_size`` 112,
``head.sub_centers`` 1, and its training set must have ``--num-classes`` + ``--add-classes`` classes.

New identities (``--add-classes K``): classes N .. N+K-1 of the training set get new rows, either
``--init id`` (default): this project's initialisation by global class id
(:func:`partialfc.init.init_weight_rows_` with ``head.seed``: the rows a fresh head would have), or
``--init mean``: the warm start, each new class's row points along the mean of its training images'
L2-normalised embeddings by the imported backbone (eval mode, no augmentation), re-normalised and
scaled to the mean norm of the rows before it (the head only uses the rows' directions; equal norms
keep SGD's step on a row's direction, ~ lr / norm, alike for old and new rows).

Without ``--fc`` the N classes get the ``--init id`` rows of a fresh head (a backbone-only import).
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from partialfc.init import init_weight_rows_
from partialfc.partition import shard_bounds, shard_sizes

from launch.checkpoint import _atomic_torch_save, _commit
from launch.config import ConfigError, TrainConfig, load_config
from launch.models.iresnet import IRESNET_LAYERS, IResNet, iresnet

IMAGE_SIZE, IN_CHANNELS = 112, 3  # insightface's fc takes a 512 x 7 x 7 map: 112 x 112 RGB faces
_SHOWN = 5  # how many offending keys an error lists


class InsightFaceImportError(ValueError):
    """The files or options cannot make a checkpoint (a one-line message saying why)."""


# loading ---------------------------------------------------------------------------------------
def _torch_load(path: Path, what: str):
    """``torch.load(weights_only=True)``, memory-mapped when the file format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files in torch's legacy (pre-1.6) format cannot be mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InsightFaceImportError(f"{what} {path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise InsightFaceImportError(f"{what} {path}: cannot be read as a weights-only torch file "
                                     f"({' '.join(str(exc).split())[:300]})") from None


def _strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """``state`` without ``prefix`` when every key has it (a state dict saved from a DDP wrapper)."""
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def read_backbone_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The backbone's state dict from insightface's ``model.pt`` (``module.`` prefix removed), or
    from the ``state_dict_backbone`` of a ``checkpoint_gpu_{rank}.pt``."""
    path = Path(path)
    state = _torch_load(path, "backbone")
    if isinstance(state, dict) and isinstance(state.get("state_dict_backbone"), dict):
        state = state["state_dict_backbone"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InsightFaceImportError(f"backbone {path}: not a state dict of tensors (got {type(state).__name__}); "
                                     "insightface's model.pt is backbone.state_dict()")
    return _strip_prefix(state)


def _stage_depths(keys) -> tuple[int, ...]:
    """Blocks per stage that the keys ``layer{i}.{j}.*`` describe."""
    depths = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    return tuple(depths)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(list(names)[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def check_backbone_state(state: dict, model: IResNet, arch: str) -> None:
    """Raise :class:`InsightFaceImportError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    problems = [f"{label}: {_listing(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names]
    depths = _stage_depths(state)
    other = [name for name, layers in IRESNET_LAYERS.items() if tuple(layers) == depths and name != arch]
    hint = f"; its stages have {list(depths)} blocks: it looks like --arch {other[0]}" if other else ""
    raise InsightFaceImportError(f"the backbone state dict does not fit insightface's iResNet {arch} "
                                 f"(our {arch}): {'; '.join(problems)}{hint}")


def build_backbone(state: dict, arch: str) -> IResNet:
    """Our iResNet ``arch`` (3 x 112 x 112, embedding size from ``fc.weight``) with ``state`` loaded strictly."""
    if arch not in IRESNET_LAYERS:
        raise InsightFaceImportError(f"unknown --arch {arch!r}; valid: {', '.join(IRESNET_LAYERS)}")
    fc = state.get("fc.weight")
    embedding_size = int(fc.shape[0]) if torch.is_tensor(fc) and fc.dim() == 2 else 512
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        model = iresnet(arch, embedding_size=embedding_size, in_channels=IN_CHANNELS, input_size=IMAGE_SIZE)
    check_backbone_state(state, model, arch)
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 files too
    model.load_state_dict(floats, strict=True, assign=True)
    return model


def file_rank(path: Path | str) -> Optional[int]:
    """The rank in a shard file's name: its last number (``checkpoint_gpu_3.pt`` -> 3), else None."""
    numbers = re.findall(r"\d+", Path(path).name.split(".")[0])
    return int(numbers[-1]) if numbers else None


def check_rank_order(paths: Sequence[Path]) -> None:
    """The files must be ranks 0, 1, ..., W-1 in this order (by the number in their names)."""
    ranks = [file_rank(p) for p in paths]
    if ranks == list(range(len(paths))):
        return
    names = [Path(p).name for p in paths]
    if None in ranks or sorted(ranks) != list(range(len(paths))):
        raise InsightFaceImportError(f"--fc: the file names must number the ranks 0..{len(paths) - 1} once each "
                                     f"(checkpoint_gpu_{{rank}}.pt), got {names}")
    ordered = [str(p) for _, p in sorted(zip(ranks, paths))]
    raise InsightFaceImportError(f"--fc: files out of rank order (ranks {ranks}); give them as: {' '.join(ordered)}")


def read_fc_shard(path: Path | str) -> torch.Tensor:
    """One rank's rows (num_local, d) from ``checkpoint_gpu_{rank}.pt`` (``state_dict_softmax_fc``
    ``weight``), a bare ``state_dict_softmax_fc``, or a bare tensor (``rank_{rank}_softmax_weight.pt``)."""
    path = Path(path)
    obj = _torch_load(path, "--fc")
    if isinstance(obj, dict) and "state_dict_softmax_fc" in obj:
        obj = obj["state_dict_softmax_fc"]
    if isinstance(obj, dict):
        obj = _strip_prefix(obj)
        if "weight" not in obj:
            raise InsightFaceImportError(f"--fc {path}: no softmax weight (keys: {_listing([str(k) for k in obj])}); "
                                         "expected checkpoint_gpu_{rank}.pt with state_dict_softmax_fc")
        obj = obj["weight"]
    if not torch.is_tensor(obj) or obj.dim() != 2:
        raise InsightFaceImportError(f"--fc {path}: the softmax weight is not a 2-D tensor of class rows")
    return obj


def read_fc_shards(paths: Sequence[Path | str], num_classes: int, width: int) -> list[torch.Tensor]:
    """The rows of every rank in rank order, checked: width ``width``, ``num_classes`` rows in all,
    and rank r holding its share under the shard rule (``partialfc.partition``)."""
    paths = [Path(p) for p in paths]
    check_rank_order(paths)
    shards = [read_fc_shard(p) for p in paths]
    for path, w in zip(paths, shards):
        if w.shape[1] != width:
            raise InsightFaceImportError(f"--fc {path}: rows of width {w.shape[1]}, the backbone's embeddings "
                                         f"have {width}")
    total = sum(w.shape[0] for w in shards)
    if total != num_classes:
        diff = total - num_classes
        raise InsightFaceImportError(
            f"--fc: the {len(paths)} shards hold {total} rows in all, --num-classes is {num_classes}: "
            f"{abs(diff)} {'more' if diff > 0 else 'fewer'} row(s) than classes (difference {diff:+d}); the "
            "shards do not come from one run of that many classes")
    expected = shard_sizes(num_classes, len(paths)) if num_classes >= len(paths) else None
    for rank, (path, w) in enumerate(zip(paths, shards)):
        if expected is None or w.shape[0] != expected[rank]:
            want = expected[rank] if expected else "at least 1"
            raise InsightFaceImportError(f"--fc {path}: {w.shape[0]} rows, but rank {rank} of {len(paths)} holds "
                                         f"{want} of {num_classes} classes")
    return shards


# new rows ----------------------------------------------------------------------------------------
def id_init_rows(class_start: int, count: int, width: int, seed: int) -> torch.Tensor:
    """(count, width): the rows a fresh head (``head.seed`` = ``seed``) gives classes from ``class_start``."""
    return init_weight_rows_(torch.empty(count, width), class_start, seed)


def _labels(dataset) -> np.ndarray:
    """Every sample's label (the data set's ``labels`` when it has them, else by reading each sample)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64).reshape(-1)


@torch.no_grad()
def mean_embedding_rows(backbone: torch.nn.Module, dataset, class_ids: Sequence[int], norm: float,
                        batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """(K, d): for each class of ``class_ids``, the normalised mean of its images' L2-normalised
    embeddings (``backbone`` in eval mode), times ``norm``. Every class needs at least one image."""
    class_ids = [int(c) for c in class_ids]
    slot = {c: i for i, c in enumerate(class_ids)}
    labels = _labels(dataset)
    index = np.flatnonzero(np.isin(labels, class_ids))
    counts = np.bincount(np.asarray([slot[int(c)] for c in labels[index]], dtype=np.int64),
                         minlength=len(class_ids))
    empty = [str(c) for c, n in zip(class_ids, counts) if n == 0]
    if empty:
        raise InsightFaceImportError(f"--init mean: no training images for new class(es) {_listing(empty)}")
    was_training = backbone.training
    backbone.eval().to(device)
    sums = torch.zeros(len(class_ids), backbone.embedding_size, dtype=torch.float64)
    try:
        for start in range(0, len(index), batch_size):
            chunk = index[start: start + batch_size]
            images = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in chunk])  # (b, C, H, W)
            emb = torch.nn.functional.normalize(backbone(images.to(device)).float(), dim=1).cpu()  # (b, d)
            slots = torch.tensor([slot[int(c)] for c in labels[chunk]])
            sums.index_add_(0, slots, emb.double())
    finally:
        backbone.train(was_training)
    return (torch.nn.functional.normalize(sums, dim=1) * norm).float()


def _mean_norm(rows: Sequence[torch.Tensor]) -> float:
    """The mean L2 norm of all rows of ``rows`` (a list of (n_i, d) blocks)."""
    total = sum(float(r.float().norm(dim=1).double().sum()) for r in rows)
    return total / max(1, sum(r.shape[0] for r in rows))


# writing ---------------------------------------------------------------------------------------
def _gather_rows(blocks: Sequence[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Global rows [start, end) of the matrix the ``blocks`` stack into, as a new float32 tensor."""
    parts, offset = [], 0
    for block in blocks:
        lo, hi = max(start, offset), min(end, offset + block.shape[0])
        if lo < hi:
            parts.append(block[lo - offset: hi - offset].float())
        offset += block.shape[0]
    return torch.cat(parts).contiguous()


def fresh_trainer_state(num_samples: int, seed: int) -> dict:
    """``trainer.pt`` of a run at step 0: the states a fresh run has (no optimizer, no LR schedule:
    the resuming run keeps the ones it built)."""
    from launch.data import ShardedSampler
    return {"step": 0, "epoch": 0, "history": [], "schedulers": [], "theta_snapshots": {},
            "scaler": torch.amp.GradScaler("cpu", enabled=True).state_dict(),  # a fresh scaler's
            "sampler": ShardedSampler(num_samples, num_replicas=1, rank=0, seed=seed).state_dict()}


def write_checkpoint(output: Path, backbone: torch.nn.Module, blocks: Sequence[torch.Tensor], world: int,
                     config: dict, trainer_state: dict, imported: dict) -> Path:
    """Write ``output`` in :mod:`launch.checkpoint`'s layout (under ``output.tmp``, renamed at the end):
    ``backbone.pt``, ``trainer.pt``, one ``head_rank{r}.pt`` per rank of ``world`` (rows of ``blocks``
    re-sharded), ``meta.json`` with every file's digest."""
    num_classes = sum(b.shape[0] for b in blocks)
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():  # left by an import that crashed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {"backbone.pt": _atomic_torch_save(backbone.state_dict(), tmp / "backbone.pt"),
             "trainer.pt": _atomic_torch_save(trainer_state, tmp / "trainer.pt")}
    shards = []
    for rank in range(world):
        start, end = shard_bounds(num_classes, world, rank)
        state = {"class_start": start, "class_end": end, "weight": _gather_rows(blocks, start, end),
                 "head_step": 0, "margin_state": {}}
        files[f"head_rank{rank}.pt"] = _atomic_torch_save(state, tmp / f"head_rank{rank}.pt")
        shards.append([start, end])
    meta = {"step": 0, "world_size": world, "num_classes": num_classes,
            "embedding_size": backbone.embedding_size, "sub_centers": 1, "shards": shards,
            "config": config, "digest": "crc32", "files": dict(sorted(files.items())), "imported": imported}
    _commit(output.parent, tmp, output, meta, keep=0)
    return output


# the import ------------------------------------------------------------------------------------
def check_config(cfg: TrainConfig, arch: str, embedding_size: int) -> None:
    """The run config must describe the imported model (one error listing every mismatch)."""
    wanted = {"model.backbone": arch, "model.embedding_size": embedding_size, "data.in_channels": IN_CHANNELS,
              "data.image_size": IMAGE_SIZE, "head.sub_centers": 1}
    bad = []
    for key, value in wanted.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        if got != value:
            bad.append(f"{key} is {got!r}, the imported model needs {value!r} (--{key} {value})")
    if bad:
        raise InsightFaceImportError("--config does not fit the import: " + "; ".join(bad))


def _load_run_data(cfg: TrainConfig, num_classes: int):
    """The config's training set without augmentation; it must have ``num_classes`` classes."""
    from launch.data import build_run_data
    try:
        data = build_run_data(dataclasses.replace(cfg.data, augment=False), seed=cfg.train.seed)
    except (OSError, ValueError) as exc:
        raise InsightFaceImportError(f"cannot load the config's training set (data.dataset "
                                     f"{cfg.data.dataset!r}): {exc}") from None
    if data.num_classes != num_classes:
        raise InsightFaceImportError(f"the config's training set has {data.num_classes} classes, the head "
                                     f"{num_classes} (--num-classes + --add-classes)")
    return data


def import_insightface(backbone: Path | str, arch: str, num_classes: int, output: Path | str,
                       cfg: TrainConfig, fc: Sequence[Path | str] = (), add_classes: int = 0,
                       init: str = "id", device: str = "cpu") -> Path:
    """Write checkpoint ``output`` from insightface files; see the module docstring. Returns ``output``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InsightFaceImportError(f"--output {output} exists and is not an empty folder")
    if num_classes < 1 or add_classes < 0:
        raise InsightFaceImportError(f"--num-classes must be >= 1 and --add-classes >= 0, got {num_classes}, "
                                     f"{add_classes}")
    if init not in ("id", "mean"):
        raise InsightFaceImportError(f"unknown --init {init!r}; valid: id, mean")
    model = build_backbone(read_backbone_state(backbone), arch)
    check_config(cfg, arch, model.embedding_size)
    d, seed = model.embedding_size, cfg.head.seed
    blocks = read_fc_shards(fc, num_classes, d) if fc else [id_init_rows(0, num_classes, d, seed)]
    data = _load_run_data(cfg, num_classes + add_classes)
    if add_classes and init == "id":
        blocks.append(id_init_rows(num_classes, add_classes, d, seed))
    elif add_classes:
        blocks.append(mean_embedding_rows(model, data.train, range(num_classes, num_classes + add_classes),
                                          _mean_norm(blocks), cfg.eval.batch_size, device))
    world = max(1, min(len(fc), num_classes + add_classes))
    imported = {"from": "insightface arcface_torch", "backbone": str(backbone), "arch": arch,
                "fc": [str(p) for p in fc], "num_classes": num_classes, "add_classes": add_classes,
                "init": init if add_classes else None}
    return write_checkpoint(output, model.cpu(), blocks, world, cfg.to_dict(),
                            fresh_trainer_state(len(data.train), cfg.train.seed), imported)


def _parse(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the rest: ``--section.key value`` overrides of the run config."""
    parser = argparse.ArgumentParser(prog="python -m launch.import_insightface", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="insightface model.pt (backbone state dict)")
    parser.add_argument("--arch", required=True, choices=list(IRESNET_LAYERS), help="the iResNet depth")
    parser.add_argument("--fc", nargs="+", default=[], metavar="FILE",
                        help="checkpoint_gpu_{rank}.pt of every rank, in rank order (optional)")
    parser.add_argument("--num-classes", type=int, required=True, help="classes of the insightface head")
    parser.add_argument("--add-classes", type=int, default=0, metavar="K", help="new classes appended (default 0)")
    parser.add_argument("--init", choices=("id", "mean"), default="id",
                        help="rows of the new classes: id-based init (default) or mean embedding")
    parser.add_argument("--config", required=True, help="the fine-tuning run's YAML config")
    parser.add_argument("--output", required=True, help="the checkpoint folder to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where --init mean embeds images")
    return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI; returns 0, or 1 with one line on stderr when the files or options do not fit."""
    args, overrides = _parse(argv)
    try:
        cfg = load_config(args.config, overrides)
        path = import_insightface(args.backbone, args.arch, args.num_classes, args.output, cfg, fc=args.fc,
                                  add_classes=args.add_classes, init=args.init, device=args.device)
    except (InsightFaceImportError, ConfigError, FileNotFoundError) as exc:
        print(f"import_insightface: {exc}", file=sys.stderr)
        return 1
    total = args.num_classes + args.add_classes
    print(f"wrote {path}: iResNet {args.arch} + head of {total} classes ({args.add_classes} added); resume it with "
          f"`launch.train --config {args.config} --train.resume {path}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

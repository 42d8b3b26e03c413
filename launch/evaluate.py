"""Evaluate a trained backbone: open-set verification and 1:N identification on held-out identities,
closed-set top-1 / top-5 classification of training identities by the trained head, and insightface
``.bin`` verification sets (LFW, CFP-FP, AgeDB-30 format) when given.

    python -m launch.evaluate --checkpoint runs/glyphs/checkpoints/step_00001000 [--bin lfw.bin ...] [--json out.json]
                              [--train-samples 2000]

Held-out glyph identities: pairs of same / different kanji (positives from different typeface
designs) give accuracy with 10-fold threshold selection, ROC AUC and TAR at FAR 1e-3 / 1e-4;
identification uses one design as the gallery and every other design as probes. The ``.bin``
files are pickles; they are read with a restricted unpickler that admits only the plain types
they contain (see ``launch/data/bin_pairs.py``), never arbitrary code.

Training identities: the head is built from the run's config (:func:`launch.trainer.build_head`, one
process) and given every row of the checkpoint: the ``head_rank{r}.pt`` shards' ``weight`` in rank
order, whatever the world size that saved them (with sub-centers a class owns several consecutive
rows; the row count comes from the files). A deterministic sample of ``--train-samples`` training
images (augmentation off) is embedded and classified with :meth:`partialfc.PartialFC.predict`:
``train_top1`` / ``train_top5`` are the shares whose label is the first / among the first five
classes (``train_samples``: how many). ``--train-samples 0`` skips this and does not read the head.
A head that does not fit the run's training classes is one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pickle
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from launch.data import BinFileError, BinPairsDataset, build_run_data
from launch.metrics import (embed, identification_top1, make_pairs, pair_scores, topk_accuracy,
                            verification_metrics)

log = logging.getLogger("launch.evaluate")


def heldout_metrics(backbone: torch.nn.Module, heldout, cfg, device) -> dict:
    """Verification + identification metrics on held-out identities (a :class:`launch.data.HeldOut`)."""
    emb = embed(backbone, heldout.images, batch_size=cfg.eval.batch_size, device=device)  # (N, d)
    n_pairs = min(cfg.eval.pairs, _max_pairs(heldout.labels, heldout.groups))
    pairs, issame = make_pairs(heldout.labels, heldout.groups, n_pairs, seed=0)
    ver = verification_metrics(pair_scores(emb, pairs), issame)
    ident = identification_top1(emb, heldout.labels, heldout.groups, cfg.eval.gallery_design)
    return {"verification_acc": ver["accuracy"], "verification_acc_std": ver["accuracy_std"],
            "auc": ver["auc"], "tar@far=1e-3": ver["tar@far=1e-3"], "tar@far=1e-4": ver["tar@far=1e-4"],
            "identification_top1": ident["top1"], "pairs": int(len(issame)), "probes": ident["n_probes"]}


def evaluate_heldout(backbone: torch.nn.Module, heldout, cfg, device) -> dict:
    """:func:`heldout_metrics` plus the ``cfg.eval.bin_files`` sets (as used during training:
    a .bin file that cannot be read is logged and skipped)."""
    result = heldout_metrics(backbone, heldout, cfg, device)
    bins, failed = evaluate_bins(backbone, cfg.eval.bin_files, cfg, device)
    for path, reason in failed.items():
        log.warning("skipped %s: %s", path, reason)
    return {**result, **bins}


#: What a bad .bin file raises: unreadable (OSError, also undecodable images),
#: refused by the restricted unpickler (UnpicklingError), corrupt or truncated (BinFileError).
BIN_FILE_ERRORS = (OSError, pickle.UnpicklingError, BinFileError)


def evaluate_bins(backbone: torch.nn.Module, paths: Sequence[str], cfg, device) -> Tuple[dict, Dict[str, str]]:
    """Evaluate every .bin set: (metrics ``<stem>_<metric>`` of those that worked,
    {path: one-line reason} for those that could not be read)."""
    result: dict = {}
    failed: Dict[str, str] = {}
    for path in paths:
        try:
            metrics = evaluate_bin(backbone, path, cfg, device)
        except BIN_FILE_ERRORS as exc:
            failed[path] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line
            continue
        result.update({f"{_stem(path)}_{k}": v for k, v in metrics.items()})
    return result, failed


def _max_pairs(labels: np.ndarray, groups: np.ndarray) -> int:
    """An even pair count the held-out set can supply without repeats (positives are the scarce ones)."""
    _, counts = np.unique(labels, return_counts=True)
    positives = int((counts * (counts - 1) // 2).sum())
    return 2 * max(1, positives)


def _stem(path: str) -> str:
    import os
    return os.path.splitext(os.path.basename(path))[0]


def evaluate_bin(backbone: torch.nn.Module, path: str, cfg, device) -> dict:
    """Verification on an insightface ``.bin`` set, with flip-augmented embeddings as is customary."""
    ds = BinPairsDataset(path, image_size=(cfg.data.image_size, cfg.data.image_size),
                         rgb=cfg.data.in_channels != 1)
    images = torch.stack([ds[i][0] for i in range(len(ds))])  # (2P, C, H, W)
    emb = embed(backbone, images, batch_size=cfg.eval.batch_size, device=device, flip=True)
    pairs = np.arange(len(images)).reshape(-1, 2)
    ver = verification_metrics(pair_scores(emb, pairs), np.asarray(ds.issame, dtype=bool))
    return {"acc": ver["accuracy"], "acc_std": ver["accuracy_std"], "auc": ver["auc"],
            "tar@far=1e-3": ver["tar@far=1e-3"]}


class CheckpointHeadError(ValueError):
    """The checkpoint's head cannot classify the run's training identities (a one-line message)."""


def _read_shard_weight(path: Path) -> torch.Tensor:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        weight = shard["weight"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise CheckpointHeadError(f"cannot read the head rows in {path}: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())}") from None
    if not torch.is_tensor(weight) or weight.dim() != 2:
        raise CheckpointHeadError(f"{path}: 'weight' is not a 2-D tensor of head rows")
    return weight


def load_head(checkpoint_dir, cfg, num_classes: int, device="cpu"):
    """The run's head on one process, holding every row of checkpoint ``checkpoint_dir``.

    Built with :func:`launch.trainer.build_head` (all head options of ``cfg``, sub-centers included);
    its rows are the ``weight`` of every saved rank's ``head_rank{r}.pt``, concatenated in rank order
    (any saved world size). Raises :class:`CheckpointHeadError` when the checkpoint has no head, its
    class count is not ``num_classes`` (the run's training classes), the shards do not tile the
    classes, or the rows do not fit the head built from the config (width, count per shard)."""
    from launch.checkpoint import read_meta
    from launch.trainer import build_head

    path = Path(checkpoint_dir)
    meta = read_meta(path)
    saved_classes, shards = meta.get("num_classes"), meta.get("shards")
    if saved_classes is None or not shards:
        raise CheckpointHeadError(f"checkpoint {path} has no head shards (meta.json lacks num_classes / shards); "
                                  "pass --train-samples 0 to skip the training-identity metrics")
    if saved_classes != num_classes:
        raise CheckpointHeadError(f"checkpoint {path} holds a head of {saved_classes} classes but the run's "
                                  f"training data ({cfg.data.dataset}) has {num_classes} classes")
    bounds = [tuple(b) for b in shards]
    if [s for s, _ in bounds] != [0] + [e for _, e in bounds[:-1]] or bounds[-1][1] != num_classes \
            or any(e < s for s, e in bounds):
        raise CheckpointHeadError(f"checkpoint {path}: shards {shards} do not tile the classes [0, {num_classes})")
    head = build_head(cfg, num_classes, group=None, device=device)
    rows, width = head.weight.shape
    weights = [_read_shard_weight(path / f"head_rank{r}.pt") for r in range(len(bounds))]
    per_class = rows // num_classes if rows % num_classes == 0 else None
    for r, ((s, e), w) in enumerate(zip(bounds, weights)):
        if w.shape[1] != width:
            raise CheckpointHeadError(f"checkpoint {path}: head_rank{r}.pt has rows of width {w.shape[1]}, "
                                      f"the head built from the config {width}")
        if per_class is not None and w.shape[0] != (e - s) * per_class:
            raise CheckpointHeadError(f"checkpoint {path}: head_rank{r}.pt has {w.shape[0]} rows for classes "
                                      f"[{s}, {e}), expected {(e - s) * per_class} ({per_class} per class)")
    total = sum(w.shape[0] for w in weights)
    if total != rows:
        raise CheckpointHeadError(f"checkpoint {path} has {total} head rows for {num_classes} classes, the head "
                                  f"built from the config {rows} (head.sub_centers={cfg.head.sub_centers})")
    offset = 0
    with torch.no_grad():
        for w in weights:
            head.weight[offset: offset + w.shape[0]].copy_(w)
            offset += w.shape[0]
    return head.eval()


def train_sample_indices(total: int, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, total)`` distinct indices of ``range(total)``, sorted; the same for the same arguments."""
    if n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def train_classification(backbone: torch.nn.Module, head, dataset, n: int, cfg, device) -> dict:
    """``train_top1`` / ``train_top5`` / ``train_samples``: :func:`train_sample_indices` samples of
    ``dataset`` (training (image, label) pairs) classified by ``head.predict`` (top-min(5, C)), a batch
    of ``cfg.eval.batch_size`` at a time."""
    index = train_sample_indices(len(dataset), n)
    k = min(5, head.num_classes)
    predicted, labels = [], []
    for start in range(0, len(index), cfg.eval.batch_size):
        items = [dataset[int(i)] for i in index[start: start + cfg.eval.batch_size]]
        images = torch.stack([torch.as_tensor(image) for image, _ in items])  # (b, C, H, W)
        labels.extend(int(label) for _, label in items)
        emb = torch.from_numpy(embed(backbone, images, batch_size=cfg.eval.batch_size, device=device))  # (b, d)
        _, ids = head.predict(emb.to(head.weight.device), k)  # (b, k), best first
        predicted.append(ids.cpu())
    ids = torch.cat(predicted).numpy() if predicted else np.zeros((0, k), np.int64)
    acc = topk_accuracy(ids, np.asarray(labels, dtype=np.int64), ks=(1, 5))
    return {"train_top1": acc[1], "train_top5": acc[5], "train_samples": int(len(index))}


def format_table(result: dict) -> str:
    """The metrics as a two-column text table."""
    if not result:
        return "no metrics"
    width = max(len(k) for k in result)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -------"]
    for k, v in result.items():
        value = f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v)
        lines.append(f"{k.ljust(width)}  {value}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI. Returns 0; 1 when the checkpoint's head does not fit the training data (one line on
    stderr, nothing evaluated) or when a .bin file could not be evaluated (each is named on stderr,
    the others are still evaluated)."""
    from launch.checkpoint import load_backbone

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--ijb" or a.startswith("--ijb=") for a in argv):  # IJB-B / IJB-C: options of its own
        from launch.ijb import main as ijb_main
        return ijb_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ijb", metavar="ROOT", help="IJB-B / IJB-C 1:1 verification instead (with --target, "
                                                      "--checkpoint or --onnx; see python -m launch.ijb --help)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--bin", nargs="*", default=[], help="insightface .bin verification sets")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--train-samples", type=_non_negative_int, default=2000, metavar="N",
                        help="training images (a fixed sample) for train_top1 / train_top5; 0 skips them "
                             "(default 2000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    backbone, cfg = load_backbone(args.checkpoint, map_location=args.device)
    # the training images as they are, without augmentation (held-out identities never have any)
    data = build_run_data(dataclasses.replace(cfg.data, augment=False), seed=cfg.train.seed)
    head = None
    if args.train_samples > 0:
        try:
            head = load_head(args.checkpoint, cfg, data.num_classes, device=args.device)
        except CheckpointHeadError as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return 1
    result = heldout_metrics(backbone, data.heldout, cfg, args.device) if data.heldout is not None else {}
    if head is not None:
        result.update(train_classification(backbone, head, data.train, args.train_samples, cfg, args.device))
    bins, failed = evaluate_bins(backbone, list(cfg.eval.bin_files) + list(args.bin), cfg, args.device)
    for path, reason in failed.items():
        print(f"evaluate: cannot evaluate {path}: {reason}", file=sys.stderr)
    result.update(bins)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if failed:
        print(f"evaluate: {len(failed)} .bin file(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())

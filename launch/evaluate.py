"""Evaluate a trained backbone: open-set verification and 1:N identification on held-out identities,
and insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30 format) when given.

    python -m launch.evaluate --checkpoint runs/glyphs/checkpoints/step_00001000 [--bin lfw.bin ...] [--json out.json]

Held-out glyph identities: pairs of same / different kanji (positives from different typeface
designs) give accuracy with 10-fold threshold selection, ROC AUC and TAR at FAR 1e-3 / 1e-4;
identification uses one design as the gallery and every other design as probes. The ``.bin``
files are pickles; they are read with a restricted unpickler that admits only the plain types
they contain (see ``launch/data/bin_pairs.py``), never arbitrary code.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from launch.data import BinFileError, BinPairsDataset, build_run_data
from launch.metrics import embed, identification_top1, make_pairs, pair_scores, verification_metrics

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
    """CLI. Returns 0, or 1 when a .bin file could not be evaluated (each is named on stderr,
    the others are still evaluated)."""
    from launch.checkpoint import load_backbone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--bin", nargs="*", default=[], help="insightface .bin verification sets")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    backbone, cfg = load_backbone(args.checkpoint, map_location=args.device)
    data = build_run_data(cfg.data, seed=cfg.train.seed)
    result = heldout_metrics(backbone, data.heldout, cfg, args.device) if data.heldout is not None else {}
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


if __name__ == "__main__":
    sys.exit(main())

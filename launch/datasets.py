"""The run's data: training set, optional held-out identities for open-set evaluation.

``build_run_data(cfg.data, seed)`` returns a :class:`RunData` whatever the source:
glyphs (the default, prepared and cached on first use), insightface RecordIO, an image folder,
or a small synthetic set (for tests and smoke runs; no files needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class HeldOut:
    """Held-out identities: images (N, C, H, W) float in [-1, 1], labels (N,), groups (N,) design id."""
    images: torch.Tensor
    labels: np.ndarray
    groups: np.ndarray


@dataclass
class RunData:
    train: Dataset
    num_classes: int
    heldout: Optional[HeldOut]


class _LabelledTensors(Dataset):
    """(image, label) pairs from tensors, with an optional per-sample augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.labels[i]


def synthetic_glyphs(num_classes: int, per_class: int, image_size: int, in_channels: int, seed: int):
    """Random class prototypes; each sample is its prototype, shifted and with noise (a 'design').

    Returns images (N, C, H, W) in [-1, 1], labels (N,), designs (N,).
    """
    g = torch.Generator().manual_seed(seed)
    proto = torch.rand(num_classes, in_channels, image_size // 4, image_size // 4, generator=g)
    proto = torch.nn.functional.interpolate(proto, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
    images, labels, designs = [], [], []
    for k in range(per_class):
        shift = torch.randint(-2, 3, (2,), generator=g).tolist()
        noisy = torch.roll(proto, shifts=shift, dims=(2, 3)) + 0.15 * torch.randn(proto.shape, generator=g)
        images.append(noisy.clamp(0, 1) * 2 - 1)
        labels.append(torch.arange(num_classes))
        designs.append(torch.full((num_classes,), k))
    return torch.cat(images), torch.cat(labels), torch.cat(designs)


def build_run_data(data_cfg, seed: int = 0) -> RunData:
    from launch.data import build_dataset, build_transform

    kind = data_cfg.dataset
    if kind == "synthetic":
        total = data_cfg.synthetic_classes + data_cfg.heldout_classes
        images, labels, designs = synthetic_glyphs(total, data_cfg.synthetic_per_class, data_cfg.image_size,
                                                   data_cfg.in_channels, seed)
        train_mask = labels < data_cfg.synthetic_classes
        held = HeldOut(images[~train_mask], (labels[~train_mask] - data_cfg.synthetic_classes).numpy(),
                       designs[~train_mask].numpy()) if data_cfg.heldout_classes else None
        return RunData(_LabelledTensors(images[train_mask], labels[train_mask]), data_cfg.synthetic_classes, held)
    if kind in ("glyphs", "glyphs_large"):
        charset = "jis1" if kind == "glyphs" else "jis"
        transform = None
        if data_cfg.augment:
            transform = build_transform("glyph", train=True)
            transform.hflip_p = 0.5 if data_cfg.hflip else 0.0
        common = dict(charset=charset, size=data_cfg.image_size, heldout_classes=data_cfg.heldout_classes,
                      seed=seed)
        train = build_dataset("glyphs", data_cfg.cache_dir, split="train", transform=transform, **common)
        held_ds = build_dataset("glyphs", data_cfg.cache_dir, split="heldout", transform=None, **common)
        gs = held_ds.glyphs
        held = HeldOut(torch.from_numpy(gs.images).float().div(127.5).sub(1).unsqueeze(1),
                       gs.labels, gs.designs) if len(gs) else None
        return RunData(train, train.num_classes, held)
    if kind in ("recordio", "folder"):
        from launch.data import RandomHorizontalFlip
        transform = RandomHorizontalFlip(0.5) if data_cfg.augment and data_cfg.hflip else None
        extra = {} if kind == "recordio" else {"grayscale": data_cfg.in_channels == 1}
        train = build_dataset(kind, data_cfg.root, split="train", transform=transform, **extra)
        return RunData(train, int(train.num_classes), None)
    raise ValueError(f"unknown data.dataset {kind!r}")

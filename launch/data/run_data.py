"""The run's data: training set, optional held-out identities for open-set evaluation.

``build_run_data(cfg.data, seed)`` returns a :class:`RunData` (both splits, from
one load of the source) whatever the source: glyphs (the default, prepared and
cached on first use), insightface RecordIO, an image folder, or a small
synthetic set (for tests and smoke runs; no files needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import ImageFolderDataset
from .glyphs import GlyphSet, build_glyph_datasets
from .recordio import RecordIODataset
from .transforms import build_transform


@dataclass
class HeldOut:
    """Held-out identities: images (N, C, H, W) float in [-1, 1], labels (N,), groups (N,) design id."""
    images: torch.Tensor
    labels: np.ndarray
    groups: np.ndarray

    @classmethod
    def from_glyphs(cls, glyphs: GlyphSet) -> Optional["HeldOut"]:
        """The held-out glyph identities (None when there are none)."""
        return cls(glyphs.float_images(), glyphs.labels, glyphs.designs) if len(glyphs) else None


@dataclass
class RunData:
    """What a training run needs: ``train`` yields (image, label) with labels in
    ``[0, num_classes)``; ``heldout`` is None when the source has no held-out identities."""
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


def _synthetic(data_cfg, seed: int) -> RunData:
    """Generated classes; the last ``heldout_classes`` of them are held out."""
    known = data_cfg.synthetic_classes
    images, labels, designs = synthetic_glyphs(known + data_cfg.heldout_classes, data_cfg.synthetic_per_class,
                                               data_cfg.image_size, data_cfg.in_channels, seed)
    train = labels < known
    held = HeldOut(images[~train], (labels[~train] - known).numpy(),
                   designs[~train].numpy()) if data_cfg.heldout_classes else None
    return RunData(_LabelledTensors(images[train], labels[train]), known, held)


def _glyphs(data_cfg, seed: int) -> RunData:
    """Rendered kanji (level 1 for ``glyphs``, levels 1 + 2 for ``glyphs_large``)."""
    transform = build_transform("glyph", train=data_cfg.augment, hflip_p=0.5 if data_cfg.hflip else 0.0)
    train, held = build_glyph_datasets(data_cfg.cache_dir, "jis1" if data_cfg.dataset == "glyphs" else "jis",
                                       data_cfg.image_size, heldout_classes=data_cfg.heldout_classes,
                                       seed=seed, train_transform=transform)
    return RunData(train, train.num_classes, HeldOut.from_glyphs(held.glyphs))


def _face_files(data_cfg, seed: int) -> RunData:
    """insightface RecordIO or an image folder; no held-out identities."""
    transform = build_transform("face", train=data_cfg.augment and data_cfg.hflip)
    if data_cfg.dataset == "recordio":
        train = RecordIODataset(data_cfg.root, transform=transform)
    else:
        train = ImageFolderDataset(data_cfg.root, transform=transform, grayscale=data_cfg.in_channels == 1)
    return RunData(train, int(train.num_classes), None)


_SOURCES = {"synthetic": _synthetic, "glyphs": _glyphs, "glyphs_large": _glyphs,
            "recordio": _face_files, "folder": _face_files}


def build_run_data(data_cfg, seed: int = 0) -> RunData:
    """Training set and held-out identities of ``data_cfg.dataset`` (a :class:`launch.config.DataConfig`)."""
    if data_cfg.dataset not in _SOURCES:
        raise ValueError(f"unknown data.dataset {data_cfg.dataset!r}; expected one of {sorted(_SOURCES)}")
    return _SOURCES[data_cfg.dataset](data_cfg, seed)

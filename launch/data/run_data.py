"""The run's data: training set, optional held-out identities for open-set evaluation.

``build_run_data(cfg.data, seed)`` returns a :class:`RunData` (both splits, from
one load of the source) whatever the source: glyphs (the default, prepared and
cached on first use), insightface RecordIO, an image folder, or a small
synthetic set (for tests and smoke runs; no files needed).

Validation split (``data.val_classes`` = V > 0, glyph and synthetic sources): V of the
*training* identities (a seeded choice, disjoint from the held-out ones) are removed from
training and become the run's evaluation set instead of the held-out identities, which are then
not evaluated at all: hyper-parameters tuned on these figures never saw the held-out ones.
``RunData.eval_split`` says which set ``RunData.heldout`` holds (``"heldout"`` or ``"val"``).
The split seed is ``data.split_seed`` when set, else the run's seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import ImageFolderDataset
from .glyphs import GlyphDataset, GlyphSet, build_glyph_datasets
from .recordio import RecordIODataset
from .transforms import build_batch_transform, build_transform

log = logging.getLogger(__name__)


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
    eval_split: str = "heldout"  # "val": ``heldout`` holds validation identities (data.val_classes > 0)
    # Augmentation of whole batches on the training device (B, C, H, W) -> (B, C, H, W), called as
    # ``batch_transform(images, generator=g)`` by the trainer; None: none (or per-sample in ``train``).
    batch_transform: Optional[Callable[..., torch.Tensor]] = None


def validation_split(num_classes: int, val_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept training classes, validation classes) of ``range(num_classes)``, each sorted: a seeded
    choice of ``val_classes`` identities (a stream of its own, not the held-out split's)."""
    if not 0 <= val_classes < num_classes:
        raise ValueError(f"data.val_classes must be in [0, {num_classes}) (the training identities), "
                         f"got {val_classes}")
    perm = np.random.default_rng([seed, 1]).permutation(num_classes)
    log.info("validation split: %d of %d training identities held back; the run evaluates on them "
             "(val), not on the held-out identities", val_classes, num_classes)
    return np.sort(perm[val_classes:]), np.sort(perm[:val_classes])


def _split_seed(data_cfg, seed: int) -> int:
    split_seed = getattr(data_cfg, "split_seed", None)
    return seed if split_seed is None else split_seed


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
    val_classes = getattr(data_cfg, "val_classes", 0)
    if not val_classes:
        return RunData(_LabelledTensors(images[train], labels[train]), known, held)
    keep, val = validation_split(known, val_classes, _split_seed(data_cfg, seed))
    remap = torch.full((known + data_cfg.heldout_classes,), -1, dtype=torch.int64)
    remap[torch.from_numpy(keep)] = torch.arange(len(keep))
    remap[torch.from_numpy(val)] = torch.arange(len(val))
    in_val = torch.zeros_like(remap, dtype=torch.bool)
    in_val[torch.from_numpy(val)] = True
    is_val, is_train = train & in_val[labels], train & ~in_val[labels]
    val_set = HeldOut(images[is_val], remap[labels[is_val]].numpy(), designs[is_val].numpy())
    return RunData(_LabelledTensors(images[is_train], remap[labels[is_train]]), len(keep), val_set, "val")


def _glyphs(data_cfg, seed: int) -> RunData:
    """Rendered kanji (level 1 for ``glyphs``, levels 1 + 2 for ``glyphs_large``)."""
    # Augmented per batch on the training device (one resampling of the whole batch), not per sample.
    batch_transform = build_batch_transform("glyph", train=data_cfg.augment, hflip_p=0.5 if data_cfg.hflip else 0.0,
                                            stroke=getattr(data_cfg, "stroke_jitter", 0.0))
    seed = _split_seed(data_cfg, seed)
    train, held = build_glyph_datasets(data_cfg.cache_dir, "jis1" if data_cfg.dataset == "glyphs" else "jis",
                                       data_cfg.image_size, heldout_classes=data_cfg.heldout_classes, seed=seed)
    val_classes = getattr(data_cfg, "val_classes", 0)
    if not val_classes:
        return RunData(train, train.num_classes, HeldOut.from_glyphs(held.glyphs), batch_transform=batch_transform)
    keep, val = validation_split(train.num_classes, val_classes, seed)
    kept = GlyphDataset(train.glyphs.subset_classes(keep))
    return RunData(kept, kept.num_classes, HeldOut.from_glyphs(train.glyphs.subset_classes(val)), "val",
                   batch_transform=batch_transform)


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

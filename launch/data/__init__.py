"""Data layer of the training app.

Data sets (all return ``(image float32 (C, H, W) in [-1, 1], int64 label)``):

* :class:`GlyphDataset` - printed kanji rendered from Debian's free CJK fonts
  (the default, offline data set; :func:`prepare_glyphs` builds its cache:
  fonts in :mod:`.glyph_fonts`, rendering in :mod:`.glyph_render`, the cache
  in :mod:`.glyph_prepare`; the Dataset in :mod:`.glyphs`).
* :class:`RecordIODataset` - insightface ``train.rec``/``train.idx`` sets, no MXNet.
* :class:`ImageFolderDataset` - ``root/<identity>/<image>`` folders.
* :class:`BinPairsDataset` - insightface ``.bin`` verification pairs.

:func:`build_run_data` (:mod:`.run_data`) gives a training run its data: the
training set and the held-out identities, from one load, whatever the source.
Plus torch-only augmentation (:mod:`.transforms`) and a resumable,
non-padding distributed sampler (:class:`ShardedSampler`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch.utils.data import Dataset

from .bin_pairs import (BinFileError, BinPairsDataset, RestrictedUnpickler, UnsafePickleError,
                        load_bin, restricted_loads, write_bin)
from .folder import ImageFolderDataset, scan_image_folder
from .glyph_fonts import FONT_PACKAGES, download_font_packages
from .glyph_prepare import CHARSETS, default_cache_dir, jis_kanji, prepare_glyphs
from .glyphs import (GlyphDataset, GlyphSet, build_glyph_datasets, load_glyphs, split_classes,
                     split_glyphs)
from .recordio import (IRHeader, RecordIODataset, RecordIOError, RecordIOReader, read_index,
                       write_recordio)
from .run_data import HeldOut, RunData, build_run_data, synthetic_glyphs, validation_split
from .sampler import ShardedSampler
from .transforms import (BatchRandomAffine, Compose, RandomAffine, RandomHorizontalFlip, affine,
                         build_batch_transform, build_transform,
                         to_float)

__all__ = [
    "BinFileError", "BinPairsDataset", "CHARSETS", "Compose", "FONT_PACKAGES", "GlyphDataset",
    "BatchRandomAffine", "GlyphSet", "HeldOut", "IRHeader", "ImageFolderDataset", "RandomAffine",
    "RandomHorizontalFlip", "RecordIODataset", "RecordIOError", "RecordIOReader",
    "RestrictedUnpickler", "RunData", "ShardedSampler", "UnsafePickleError", "affine",
    "build_batch_transform", "build_dataset", "build_glyph_datasets", "build_run_data", "build_transform",
    "default_cache_dir", "download_font_packages", "jis_kanji", "load_bin", "load_glyphs",
    "prepare_glyphs", "read_index", "restricted_loads", "scan_image_folder", "split_classes",
    "split_glyphs", "synthetic_glyphs", "to_float", "validation_split", "write_bin", "write_recordio",
]

DATASET_KINDS = ("glyphs", "recordio", "folder", "bin")

_DEFAULT = "default"


def build_dataset(
    kind: str,
    root: Optional[Union[str, Path]] = None,
    *,
    split: str = "train",
    transform: Union[str, None, Callable[..., Any]] = _DEFAULT,
    **kwargs: Any,
) -> Dataset:
    """Build a data set by kind.

    Args:
        kind: ``"glyphs"`` (``root`` = cache dir, default
            :func:`default_cache_dir`; ``split`` = ``"train"`` or ``"heldout"``;
            kwargs of :func:`build_glyph_datasets`, e.g. ``charset``, ``size``,
            ``min_designs``, ``heldout_classes``, ``seed``), ``"recordio"``
            (``root`` = folder with train.rec/train.idx or a .rec path),
            ``"folder"`` (``root`` = image folder; ``grayscale=``) or ``"bin"``
            (``root`` = a .bin file; ``image_size=``).
        transform: ``"default"`` = :func:`build_transform` for the kind
            (augmentation only for a training split), None, or a callable.
    """
    train = split == "train"
    if transform == _DEFAULT:
        transform = build_transform("glyph" if kind == "glyphs" else "face",
                                    train=train and kind != "bin")
    if kind == "glyphs":
        if split not in ("train", "heldout"):
            raise ValueError(f"glyph split must be 'train' or 'heldout', got {split!r}")
        train_ds, held_ds = build_glyph_datasets(root, train_transform=transform,
                                                 heldout_transform=transform, **kwargs)
        return train_ds if train else held_ds
    if root is None:
        raise ValueError(f"data set kind {kind!r} needs a root path")
    if kind == "recordio":
        return RecordIODataset(root, transform=transform, **kwargs)
    if kind == "folder":
        return ImageFolderDataset(root, transform=transform, **kwargs)
    if kind == "bin":
        return BinPairsDataset(root, transform=transform, **kwargs)
    raise ValueError(f"unknown data set kind {kind!r}; expected one of {DATASET_KINDS}")

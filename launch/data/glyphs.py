"""Printed-kanji identities rendered from Debian's free CJK typefaces: the data set.

The default, fully offline data set of the training app. Every kanji is an
identity (class) and every distinct typeface design is one "photo" of it, so
the task looks like face recognition: many classes, a few samples each, and
open-set evaluation on kanji held out of training.

The rendered cache is built by :func:`.glyph_prepare.prepare_glyphs` (fonts
from :mod:`.glyph_fonts`, rendering in :mod:`.glyph_render`). This module
loads it (:func:`load_glyphs` keeps only characters present in at least
``min_designs`` designs), splits identities deterministically into training
and held-out (open-set) classes (:func:`split_glyphs`) and wraps them as
:class:`GlyphDataset`; :func:`build_glyph_datasets` does all of it, returning
both splits from one load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .glyph_prepare import prepare_glyphs
from .transforms import to_float

log = logging.getLogger(__name__)


@dataclass
class GlyphSet:
    """Rendered glyphs: ``images`` uint8 (N, H, W), ``labels`` int64 (N,) in
    0..len(chars)-1, ``designs`` int64 (N,) in 0..len(faces)-1."""

    images: np.ndarray
    labels: np.ndarray
    designs: np.ndarray
    chars: List[str]
    faces: List[str]

    @property
    def num_classes(self) -> int:
        """Number of identities (characters)."""
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self) -> torch.Tensor:
        """All images as float32 (N, 1, H, W) in [-1, 1], as :class:`GlyphDataset`
        gives them without a transform."""
        return torch.from_numpy(self.images).float().div(127.5).sub(1).unsqueeze(1)

    def subset_classes(self, classes: Sequence[int]) -> "GlyphSet":
        """Keep only ``classes`` (old labels), relabelled 0..len(classes)-1 in
        the given order."""
        classes = np.asarray(classes, dtype=np.int64)
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        sel = np.flatnonzero(remap[self.labels] >= 0)
        return GlyphSet(self.images[sel], remap[self.labels[sel]], self.designs[sel],
                        [self.chars[c] for c in classes], list(self.faces))


def load_glyphs(path: Union[str, Path], min_designs: int = 1) -> GlyphSet:
    """Load a glyph cache, keeping characters present in >= ``min_designs`` designs."""
    with np.load(path, allow_pickle=False) as z:
        gs = GlyphSet(z["images"], z["labels"].astype(np.int64), z["design"].astype(np.int64),
                      [str(c) for c in z["chars"]], [str(f) for f in z["faces"]])
    counts = np.bincount(gs.labels, minlength=gs.num_classes)  # designs per character
    return gs.subset_classes(np.flatnonzero(counts >= min_designs))


def split_classes(num_classes: int, heldout_classes: int = 300,
                  seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic seeded split of ``range(num_classes)`` into (train, heldout),
    each sorted ascending."""
    if not 0 <= heldout_classes < num_classes:
        raise ValueError(f"heldout_classes must be in [0, {num_classes}), got {heldout_classes}")
    perm = np.random.default_rng(seed).permutation(num_classes)
    return np.sort(perm[heldout_classes:]), np.sort(perm[:heldout_classes])


def split_glyphs(glyphs: GlyphSet, heldout_classes: int = 300,
                 seed: int = 0) -> Tuple[GlyphSet, GlyphSet]:
    """(train, heldout) glyph sets; each relabelled to 0..K-1."""
    train, held = split_classes(glyphs.num_classes, heldout_classes, seed)
    return glyphs.subset_classes(train), glyphs.subset_classes(held)


class GlyphDataset(Dataset):
    """``(image, label)`` pairs of a :class:`GlyphSet`.

    ``image`` is float32 (1, H, W) in [-1, 1] (black background = -1) after
    the optional ``transform`` (called as ``transform(image)``); ``label`` is
    an int64 scalar tensor.
    """

    def __init__(self, glyphs: GlyphSet,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.glyphs = glyphs
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of identities."""
        return self.glyphs.num_classes

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels, e.g. for samplers or pair building."""
        return self.glyphs.labels

    def __len__(self) -> int:
        return len(self.glyphs)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.glyphs.images[i])  # (1, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(int(self.glyphs.labels[i]), dtype=torch.int64)


def build_glyph_datasets(
    cache_dir: Optional[Union[str, Path]] = None,
    charset: Union[str, Sequence[str]] = "jis1",
    size: int = 32,
    min_designs: int = 4,
    heldout_classes: int = 300,
    seed: int = 0,
    train_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    heldout_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **prepare_kwargs,
) -> Tuple[GlyphDataset, GlyphDataset]:
    """Prepare (or reuse) the cache, load it once, filter, split, and wrap: (train, heldout).

    ``prepare_kwargs`` go to :func:`.glyph_prepare.prepare_glyphs`. Held-out
    identities are for open-set evaluation: normally not augmented.
    """
    path = prepare_glyphs(cache_dir, charset, size, **prepare_kwargs)
    glyphs = load_glyphs(path, min_designs)
    train, held = split_glyphs(glyphs, heldout_classes, seed)
    log.info("glyphs: %d kanji kept (>= %d designs each), %d designs, %d images; "
             "%d training classes (%d images), %d held-out classes (%d images)",
             glyphs.num_classes, min_designs, len(glyphs.faces), len(glyphs),
             train.num_classes, len(train), held.num_classes, len(held))
    return GlyphDataset(train, train_transform), GlyphDataset(held, heldout_transform)


if __name__ == "__main__":  # the preparation CLI used to live here
    from launch.data import glyph_prepare as _prepare

    _prepare.main()

"""Image-folder data set: ``root/<identity>/<image>``, one sub-folder per identity.

Identities are the sub-folder names in sorted order, labelled ``0..K-1``;
images are the files with a known image suffix inside each (sorted, not
recursive). Hidden entries (starting with ``.``) are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import to_float

IMAGE_SUFFIXES: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def scan_image_folder(
    root: Union[str, Path], suffixes: Sequence[str] = IMAGE_SUFFIXES
) -> Tuple[List[str], List[Path], np.ndarray]:
    """``(class names, image paths, int64 labels (N,))`` of an image folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    suffixes = tuple(s.lower() for s in suffixes)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: List[Path] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in suffixes:
                paths.append(f)
                labels.append(label)
    return classes, paths, np.asarray(labels, dtype=np.int64)


class ImageFolderDataset(Dataset):
    """``(image, label)`` from ``root/<identity>/<file>``.

    ``image`` is float32 (3, H, W) in [-1, 1] (``grayscale=True``: (1, H, W))
    after the optional ``transform``; ``label`` an int64 scalar tensor.
    """

    def __init__(self, root: Union[str, Path],
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 grayscale: bool = False) -> None:
        self.root = Path(root)
        self.classes, self.paths, self._labels = scan_image_folder(self.root)
        if not self.paths:
            raise FileNotFoundError(f"no images found under {self.root}")
        self.transform = transform
        self.grayscale = grayscale

    @property
    def num_classes(self) -> int:
        """Number of identities (sub-folders)."""
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels."""
        return self._labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as img:
            arr = np.asarray(img.convert("L" if self.grayscale else "RGB"))  # (H, W[, 3])
        x = to_float(arr)  # (C, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(int(self._labels[i]), dtype=torch.int64)

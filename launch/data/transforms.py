"""Torch-only image augmentation and normalisation (torchvision is not used).

Every transform works on one image tensor ``(C, H, W)`` of floats in ``[-1, 1]``
and takes an optional ``torch.Generator``: with a generator seeded the same way
the output is bit-for-bit the same; without one the global torch RNG is used
(which ``DataLoader`` seeds differently in every worker).

Geometric augmentation is a single affine resampling (``affine_grid`` +
``grid_sample``) that combines a shift, a scale (zoom in = random crop), a
rotation and a horizontal flip. Pixels coming from outside the image take the
value ``fill`` (``-1`` = black after normalisation, the glyph background).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

Transform = Callable[..., torch.Tensor]


def to_float(image: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Convert a uint8 image to a float32 tensor ``(C, H, W)`` in ``[-1, 1]``.

    Accepts ``(H, W)`` (grey), ``(H, W, C)`` (channels-last, as Pillow/numpy give
    them) or an already channels-first ``(C, H, W)`` torch tensor with C in {1, 3}.
    Pixel value ``v`` maps to ``v / 127.5 - 1`` (0 -> -1, 255 -> 1).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image, order="C")  # e.g. read-only arrays from Pillow
        t = torch.from_numpy(image)
        if t.ndim == 2:  # (H, W) -> (1, H, W)
            t = t.unsqueeze(0)
        elif t.ndim == 3:  # (H, W, C) -> (C, H, W)
            t = t.permute(2, 0, 1)
        else:
            raise ValueError(f"expected (H, W) or (H, W, C), got shape {image.shape}")
    else:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        t = image.unsqueeze(0) if image.ndim == 2 else image
        if t.ndim != 3:
            raise ValueError(f"expected (C, H, W), got shape {tuple(image.shape)}")
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def affine(
    image: torch.Tensor,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shift: Tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
    fill: float = -1.0,
) -> torch.Tensor:
    """Resample ``image`` (C, H, W) under a similarity transform about its centre.

    The content is (in this order) flipped left-right if ``flip``, scaled by
    ``scale`` (>1 enlarges: a centred crop), rotated by ``angle_deg``
    counter-clockwise as the image is displayed (row 0 at the top), and moved by
    ``shift = (dx, dy)`` pixels (right, down). Returns a new (C, H, W) tensor.
    """
    if image.ndim != 3:
        raise ValueError(f"expected (C, H, W), got shape {tuple(image.shape)}")
    _, h, w = image.shape
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    # Forward map in pixel units, origin at the image centre, y pointing down:
    #   p_out = s * R * Fl * p_in + t, R = [[cos, sin], [-sin, cos]] (CCW on screen).
    # grid_sample needs the inverse, p_in = Fl * R^T * (p_out - t) / s.
    fx = -1.0 if flip else 1.0
    inv = torch.tensor(
        [[fx * cos, -fx * sin], [sin, cos]], dtype=torch.float64
    ) / scale  # (2, 2) = Fl @ R^T / s
    t = torch.tensor(shift, dtype=torch.float64)  # (2,)
    offset = -inv @ t  # (2,)
    # Normalised coordinates u = x / (w / 2), v = y / (h / 2) (align_corners=False).
    d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    theta = torch.empty(2, 3, dtype=torch.float64)
    theta[:, :2] = inv * d[None, :] / d[:, None]  # D^-1 @ inv @ D
    theta[:, 2] = offset / d
    grid = F.affine_grid(
        theta.to(image.dtype).unsqueeze(0), [1, *image.shape], align_corners=False
    )  # (1, H, W, 2)
    # Sampling (x - fill) with zero padding, then adding fill back, pads with fill.
    out = F.grid_sample(
        (image - fill).unsqueeze(0), grid, mode="bilinear",
        padding_mode="zeros", align_corners=False,
    )[0]
    return out + fill


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    """One float drawn uniformly from [low, high)."""
    u = torch.rand((), generator=generator).item()
    return low + (high - low) * u


class RandomAffine:
    """Random shift / scale (crop) / rotation / horizontal flip in one resampling.

    Args:
        max_shift: largest shift as a fraction of the image side (each axis).
        scale: (min, max) zoom factor; values > 1 crop into the image.
        max_rotate_deg: rotation drawn uniformly from [-max, +max] degrees.
        hflip_p: probability of a left-right flip (0 for glyphs, 0.5 for faces).
        fill: value of pixels that come from outside the image.
    """

    def __init__(
        self,
        max_shift: float = 0.08,
        scale: Tuple[float, float] = (0.9, 1.1),
        max_rotate_deg: float = 8.0,
        hflip_p: float = 0.0,
        fill: float = -1.0,
    ) -> None:
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError("hflip_p must be in [0, 1]")
        if not 0.0 < scale[0] <= scale[1]:
            raise ValueError("scale must be (min, max) with 0 < min <= max")
        self.max_shift = float(max_shift)
        self.scale = (float(scale[0]), float(scale[1]))
        self.max_rotate_deg = float(max_rotate_deg)
        self.hflip_p = float(hflip_p)
        self.fill = float(fill)

    def __call__(
        self, image: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Augment one image (C, H, W) -> (C, H, W)."""
        _, h, w = image.shape
        dx = _uniform(-self.max_shift, self.max_shift, generator) * w
        dy = _uniform(-self.max_shift, self.max_shift, generator) * h
        s = _uniform(self.scale[0], self.scale[1], generator)
        angle = _uniform(-self.max_rotate_deg, self.max_rotate_deg, generator)
        flip = bool(torch.rand((), generator=generator).item() < self.hflip_p)
        if dx == dy == angle == 0.0 and s == 1.0 and not flip:
            return image.clone()
        return affine(image, angle, s, (dx, dy), flip, self.fill).clamp_(-1.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"RandomAffine(max_shift={self.max_shift}, scale={self.scale}, "
            f"max_rotate_deg={self.max_rotate_deg}, hflip_p={self.hflip_p}, fill={self.fill})"
        )


class RandomHorizontalFlip:
    """Flip left-right with probability ``p`` (no resampling)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(
        self, image: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """(C, H, W) -> (C, H, W)."""
        if torch.rand((), generator=generator).item() < self.p:
            return image.flip(-1)
        return image


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        for t in self.transforms:
            image = t(image, generator=generator)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def build_transform(kind: str = "glyph", train: bool = True,
                    hflip_p: Optional[float] = None) -> Optional[Transform]:
    """The standard augmentation for a data kind; ``None`` when not training.

    ``glyph``: small shift, scale and rotation, by default no flip (a mirrored
    kanji is a different shape). ``face``: flip only, as in insightface training
    (the faces are already aligned), by default with probability 0.5.
    ``hflip_p`` overrides the kind's flip probability.
    """
    if not train:
        return None
    if kind == "glyph":
        return RandomAffine(max_shift=0.08, scale=(0.9, 1.1), max_rotate_deg=8.0,
                            hflip_p=0.0 if hflip_p is None else hflip_p)
    if kind == "face":
        return RandomHorizontalFlip(0.5 if hflip_p is None else hflip_p)
    raise ValueError(f"unknown transform kind {kind!r} (expected 'glyph' or 'face')")

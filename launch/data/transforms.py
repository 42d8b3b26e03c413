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
    f64 = dict(dtype=torch.float64)
    return resample(image.unsqueeze(0), torch.tensor([angle_deg], **f64), torch.tensor([scale], **f64),
                    torch.tensor([shift], **f64), torch.tensor([flip]), fill)[0]


def resample(images: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             flip: torch.Tensor, fill: float = -1.0) -> torch.Tensor:
    """:func:`affine` for a batch in one ``affine_grid`` + ``grid_sample``: ``images`` (B, C, H, W),
    per image ``angle_deg`` (B,), ``scale`` (B,), ``shift`` (B, 2) pixels (right, down), all float64,
    and ``flip`` (B,) bool. Returns a new (B, C, H, W) tensor."""
    b, _, h, w = images.shape
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a), torch.sin(a)  # (B,)
    # Forward map in pixel units, origin at the image centre, y pointing down:
    #   p_out = s * R * Fl * p_in + t, R = [[cos, sin], [-sin, cos]] (CCW on screen).
    # grid_sample needs the inverse, p_in = Fl * R^T * (p_out - t) / s.
    fx = torch.where(flip, -1.0, 1.0).to(torch.float64)
    inv = torch.stack([torch.stack([fx * cos, -fx * sin], -1), torch.stack([sin, cos], -1)], -2)
    inv = inv / scale.view(b, 1, 1)  # (B, 2, 2) = Fl @ R^T / s
    offset = -(inv @ shift.unsqueeze(-1)).squeeze(-1)  # (B, 2)
    # Normalised coordinates u = x / (w / 2), v = y / (h / 2) (align_corners=False).
    d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    theta = torch.cat([inv * d[None, None, :] / d[None, :, None],  # D^-1 @ inv @ D
                       (offset / d).unsqueeze(-1)], -1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    # Sampling (x - fill) with zero padding, then adding fill back, pads with fill.
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
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


class BatchRandomAffine:
    """:class:`RandomAffine`'s distribution for a whole batch, in one ``affine_grid`` + ``grid_sample``.

    The per-sample transform costs ~0.15 ms of Python and tiny tensor ops per 32x32 image (about a
    tenth of a CPU training step of cnn_small); here the parameters of all B images are drawn at once
    (on the CPU, from ``generator``) and the batch is resampled in one call, on the batch's device.

    ``stroke`` > 0 also varies the stroke weight (typefaces differ most in it): each image is blended
    toward its 3x3 grey dilation (bolder, a > 0) or erosion (lighter, a < 0) by a = U(-stroke, stroke),
    before the geometric resampling. Bright strokes on a dark background (``fill``) are assumed.

    Shapes: images (B, C, H, W) float -> (B, C, H, W), values clamped to [-1, 1].
    """

    def __init__(self, max_shift: float = 0.08, scale: Tuple[float, float] = (0.9, 1.1),
                 max_rotate_deg: float = 8.0, hflip_p: float = 0.0, fill: float = -1.0,
                 stroke: float = 0.0) -> None:
        RandomAffine(max_shift, scale, max_rotate_deg, hflip_p, fill)  # the same argument checks
        if not 0.0 <= stroke <= 1.0:
            raise ValueError(f"stroke must be in [0, 1], got {stroke}")
        self.max_shift, self.scale, self.max_rotate_deg = float(max_shift), (float(scale[0]), float(scale[1])), float(max_rotate_deg)
        self.hflip_p, self.fill, self.stroke = float(hflip_p), float(fill), float(stroke)

    def draw(self, batch: int, height: int, width: int,
             generator: Optional[torch.Generator] = None) -> dict:
        """The parameters of ``batch`` images, float64 on the CPU: dx, dy (pixels), scale, angle
        (degrees), flip (bool), stroke blend a (0 when ``stroke`` is 0); each (batch,)."""
        u = torch.rand(6, batch, generator=generator, dtype=torch.float64)  # (6, B)
        return {"dx": (2 * u[0] - 1) * self.max_shift * width, "dy": (2 * u[1] - 1) * self.max_shift * height,
                "scale": self.scale[0] + (self.scale[1] - self.scale[0]) * u[2],
                "angle": (2 * u[3] - 1) * self.max_rotate_deg, "flip": u[4] < self.hflip_p,
                "stroke": (2 * u[5] - 1) * self.stroke}

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """Resample ``images`` (B, C, H, W) with the parameters ``p`` of :meth:`draw`."""
        if images.ndim != 4:
            raise ValueError(f"expected (B, C, H, W), got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        x = images
        if self.stroke > 0:
            a = p["stroke"].to(images.device, images.dtype).view(b, 1, 1, 1)  # (B, 1, 1, 1)
            bold = F.max_pool2d(x, 3, stride=1, padding=1)
            light = -F.max_pool2d(-x, 3, stride=1, padding=1)
            x = x + a.clamp(min=0) * (bold - x) + (-a).clamp(min=0) * (light - x)
        shift = torch.stack([p["dx"], p["dy"]], -1)  # (B, 2) pixels
        return resample(x, p["angle"], p["scale"], shift, p["flip"], self.fill).clamp_(-1.0, 1.0)

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augment a batch (B, C, H, W) -> (B, C, H, W)."""
        return self.apply(images, self.draw(images.shape[0], images.shape[-2], images.shape[-1], generator))

    def __repr__(self) -> str:
        return (f"BatchRandomAffine(max_shift={self.max_shift}, scale={self.scale}, max_rotate_deg="
                f"{self.max_rotate_deg}, hflip_p={self.hflip_p}, fill={self.fill}, stroke={self.stroke})")


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


def build_batch_transform(kind: str = "glyph", train: bool = True, hflip_p: Optional[float] = None,
                          stroke: float = 0.0) -> Optional[BatchRandomAffine]:
    """The batched form of :func:`build_transform` (``glyph`` only: the trainer applies it to each
    batch on its device); ``None`` when not training or for kinds without one."""
    if not train or kind != "glyph":
        return None
    return BatchRandomAffine(max_shift=0.08, scale=(0.9, 1.1), max_rotate_deg=8.0,
                             hflip_p=0.0 if hflip_p is None else hflip_p, stroke=stroke)

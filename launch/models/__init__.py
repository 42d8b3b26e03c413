"""Backbone registry for the training application.

``build_backbone(name, ...)`` is the single entry point used by the app; the
names are ``"cnn_small"`` (a small CNN for 32x32 glyphs) and the iResNet
depths ``"r18"``, ``"r34"``, ``"r50"``, ``"r100"`` (3x112x112 faces).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .cnn import SmallCNN
from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet

__all__ = [
    "BACKBONES",
    "IBasicBlock",
    "IResNet",
    "SmallCNN",
    "build_backbone",
    "iresnet",
]

#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = ("cnn_small", *IRESNET_LAYERS)


def build_backbone(
    name: str,
    embedding_size: int,
    in_channels: int,
    image_size: int,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        embedding_size: output embedding dimension.
        in_channels: number of input image channels.
        image_size: side of the square input images.
        **kwargs: extra constructor options (e.g. ``width`` / ``dropout`` for
            ``cnn_small``; ``dropout`` / ``check_input_size`` for iResNets).

    Returns:
        A module mapping ``(B, in_channels, image_size, image_size)`` to
        ``(B, embedding_size)``; it exposes ``in_channels``, ``image_size`` and
        ``embedding_size`` attributes.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    if name == "cnn_small":
        return SmallCNN(
            in_channels=in_channels,
            image_size=image_size,
            embedding_size=embedding_size,
            **kwargs,
        )
    if name in IRESNET_LAYERS:
        return iresnet(
            name,
            embedding_size=embedding_size,
            in_channels=in_channels,
            input_size=image_size,
            **kwargs,
        )
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")

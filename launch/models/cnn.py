"""A small convolutional backbone for 32x32 grayscale glyph images.

It is sized to train in minutes on a couple of CPU cores while still producing
a useful embedding for margin-softmax experiments:

    stem    conv3x3(C -> w)                          H   x W
    stage1  conv3x3(w -> 2w, s2),  conv3x3(2w -> 2w)  H/2 x W/2
    stage2  conv3x3(2w -> 4w, s2), conv3x3(4w -> 4w)  H/4 x W/4
    stage3  conv3x3(4w -> 8w, s2), conv3x3(8w -> 8w)  H/8 x W/8
    head    BN2d -> dropout -> flatten -> linear -> BatchNorm1d

Every conv is followed by BatchNorm2d and ReLU.  The head flattens the final
feature map rather than pooling it, so the embedding keeps spatial layout
(which matters for glyphs), in the same way as the iResNet output layer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 (no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Small conv-BN-ReLU backbone producing an ``embedding_size`` vector.

    Args:
        in_channels: number of input channels (1 for grayscale glyphs).
        image_size: side of the square input; must be divisible by 8.
        embedding_size: dimension of the output embedding.
        width: channels of the stem; stages use 2x, 4x and 8x this.
        dropout: dropout probability applied before the final linear layer.

    Shapes:
        input  (B, in_channels, image_size, image_size)
        output (B, embedding_size)
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        embedding_size: int = 128,
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % 8 != 0 or image_size < 8:
            raise ValueError(f"SmallCNN needs image_size divisible by 8, got {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.embedding_size = embedding_size

        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w),  # (B, w, H, W)
            _conv_bn_relu(w, 2 * w, stride=2),  # (B, 2w, H/2, W/2)
            _conv_bn_relu(2 * w, 2 * w),
            _conv_bn_relu(2 * w, 4 * w, stride=2),  # (B, 4w, H/4, W/4)
            _conv_bn_relu(4 * w, 4 * w),
            _conv_bn_relu(4 * w, 8 * w, stride=2),  # (B, 8w, H/8, W/8)
            _conv_bn_relu(8 * w, 8 * w),
        )
        side = image_size // 8
        self.bn = nn.BatchNorm2d(8 * w)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(8 * w * side * side, embedding_size)
        self.features_bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to embeddings ``(B, embedding_size)``."""
        x = self.features(x)  # (B, 8w, H/8, W/8)
        x = self.dropout(self.bn(x))
        x = torch.flatten(x, 1)  # (B, 8w * H/8 * W/8)
        x = self.fc(x)  # (B, E)
        return self.features_bn(x)

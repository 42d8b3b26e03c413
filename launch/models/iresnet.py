"""iResNet ("improved ResNet"), the standard ArcFace face-recognition backbone.

Layout for a 3x112x112 input (spatial sizes in the right column):

    stem    conv3x3(3 -> 64) -> BN -> PReLU                       112
    layer1  blocks[0] x IBasicBlock(64),  first block stride 2     56
    layer2  blocks[1] x IBasicBlock(128), first block stride 2     28
    layer3  blocks[2] x IBasicBlock(256), first block stride 2     14
    layer4  blocks[3] x IBasicBlock(512), first block stride 2      7
    output  BN2d -> dropout -> flatten -> linear(512*7*7 -> E) -> BatchNorm1d

The basic block is pre-activation-like:

    BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN   (+ shortcut)

where the shortcut is the identity, or conv1x1(stride) + BN when the shape
changes.  Depths: r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3],
r100 [3,13,30,3].

Mixed precision: the model contains nothing precision-specific, so it can be
run under ``torch.autocast`` (fp16 on GPU, bf16 on CPU) as is.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["IBasicBlock", "IResNet", "IRESNET_LAYERS", "iresnet"]

#: Number of basic blocks per stage for each named depth.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}

_BN_EPS = 1e-5


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """iResNet basic block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut.

    Shapes: ``(B, in_ch, H, W) -> (B, out_ch, H / stride, W / stride)``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride=stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)  # spatial / stride
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone mapping ``(B, C, S, S)`` images to ``(B, E)`` embeddings.

    Args:
        layers: number of blocks in each of the four stages.
        embedding_size: output embedding dimension ``E`` (512 for face models).
        in_channels: input channels ``C`` (3 for RGB faces).
        input_size: input side ``S``; must be divisible by 16 (112 -> 7x7 final map).
        dropout: dropout probability before the final linear layer.
        check_input_size: if True, ``forward`` raises a ``ValueError`` naming the
            expected size when the input's spatial size is not ``S x S``
            (instead of an opaque matmul shape error in the final linear layer).
        zero_init_residual: initialise the last BN of every block to zero so that
            each residual branch starts as the identity.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        in_channels: int = 3,
        input_size: int = 112,
        dropout: float = 0.0,
        check_input_size: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"iResNet needs 4 stage depths, got {list(layers)}")
        if input_size % 16 != 0 or input_size < 16:
            raise ValueError(f"iResNet needs input_size divisible by 16, got {input_size}")
        self.in_channels = in_channels
        self.image_size = input_size
        self.embedding_size = embedding_size
        self.check_input_size = check_input_size

        widths = (64, 128, 256, 512)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        stages = []
        in_ch = widths[0]
        for n_blocks, out_ch in zip(layers, widths):
            blocks = [IBasicBlock(in_ch, out_ch, stride=2)]
            blocks += [IBasicBlock(out_ch, out_ch) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def _check(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}), got {tuple(x.shape)}; resize/crop the "
                f"images or build the model with input_size={x.shape[-1]}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, S, S)`` to embeddings ``(B, E)``."""
        if self.check_input_size and not torch.jit.is_tracing():
            self._check(x)
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, S, S)
        x = self.layer1(x)  # (B, 64, S/2, S/2)
        x = self.layer2(x)  # (B, 128, S/4, S/4)
        x = self.layer3(x)  # (B, 256, S/8, S/8)
        x = self.layer4(x)  # (B, 512, S/16, S/16)
        x = self.dropout(self.bn2(x))
        x = torch.flatten(x, 1)  # (B, 512 * (S/16)^2)
        x = self.fc(x)  # (B, E)
        return self.features(x)


def iresnet(
    name: str,
    embedding_size: int = 512,
    in_channels: int = 3,
    input_size: int = 112,
    **kwargs,
) -> IResNet:
    """Build a named iResNet (``"r18"``, ``"r34"``, ``"r50"`` or ``"r100"``)."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown iResNet {name!r}; valid: {sorted(IRESNET_LAYERS)}")
    return IResNet(
        IRESNET_LAYERS[name],
        embedding_size=embedding_size,
        in_channels=in_channels,
        input_size=input_size,
        **kwargs,
    )

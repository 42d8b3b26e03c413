"""Tests for launch.models: shapes, parameter counts, gradients, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launch.models import BACKBONES, IResNet, SmallCNN, build_backbone

DEPTHS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3]}


def expected_iresnet_params(
    layers: list[int], emb: int = 512, in_ch: int = 3, side: int = 7
) -> int:
    """Parameter count worked out by hand from the architecture description."""
    bn = lambda c: 2 * c  # noqa: E731 - weight + bias
    total = in_ch * 64 * 9 + bn(64) + 64  # stem conv, BN, PReLU
    c_in = 64
    for n_blocks, c in zip(layers, (64, 128, 256, 512)):
        for b in range(n_blocks):
            i = c_in if b == 0 else c
            total += bn(i) + i * c * 9 + bn(c) + c + c * c * 9 + bn(c)  # BN conv BN PReLU conv BN
            if b == 0:
                total += i * c + bn(c)  # 1x1 downsample + BN (first block has stride 2)
        c_in = c
    total += bn(512) + 512 * side * side * emb + emb + bn(emb)  # BN2d, fc, BN1d
    return total


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100"])
def test_iresnet_param_count_matches_hand_count(name: str) -> None:
    with torch.device("meta"):  # shapes only, no memory / init cost
        model = build_backbone(name, embedding_size=512, in_channels=3, image_size=112)
    assert n_params(model) == expected_iresnet_params(DEPTHS[name])


def test_iresnet_param_ballpark() -> None:
    # published sizes of the ArcFace iResNets with a 512-d embedding
    assert 43.4e6 < expected_iresnet_params(DEPTHS["r50"]) < 43.8e6
    assert 23.8e6 < expected_iresnet_params(DEPTHS["r18"]) < 24.2e6
    assert 65.0e6 < expected_iresnet_params(DEPTHS["r100"]) < 65.4e6


def test_iresnet_output_and_stage_shapes() -> None:
    model = build_backbone("r18", embedding_size=512, in_channels=3, image_size=112).eval()
    shapes = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 112, 112))
    assert shapes == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert y.shape == (2, 512)
    assert torch.isfinite(y).all()


def test_iresnet_other_sizes_and_input_check() -> None:
    model = build_backbone("r18", embedding_size=64, in_channels=1, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 64)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        model(torch.randn(2, 1, 48, 48))
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone("r18", 512, 3, 100)


def test_small_cnn_shapes() -> None:
    model = build_backbone("cnn_small", embedding_size=128, in_channels=1, image_size=32)
    assert isinstance(model, SmallCNN)
    assert model(torch.randn(4, 1, 32, 32)).shape == (4, 128)
    wide = SmallCNN(in_channels=3, image_size=64, embedding_size=32, width=8)
    assert wide(torch.randn(2, 3, 64, 64)).shape == (2, 32)
    assert n_params(model) < 3e6  # small enough for CPU training


# iResNet at 32x32 runs the same code path as at 112x112, much faster
@pytest.mark.parametrize("name,shape", [("cnn_small", (4, 1, 32, 32)), ("r18", (2, 3, 32, 32))])
def test_gradient_reaches_every_parameter(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, 128, shape[1], shape[2]).train()
    model(torch.randn(shape)).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


def test_eval_mode_is_per_sample() -> None:
    # BatchNorm in eval mode: a sample's embedding must not depend on the batch
    torch.manual_seed(0)
    model = build_backbone("cnn_small", 16, 1, 32)
    model(torch.randn(8, 1, 32, 32))  # update running stats
    model.eval()
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[2:3], model(x[2:3]), rtol=1e-4, atol=1e-5)


def test_small_cnn_can_fit_tiny_problem() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 16, 16)
    y = torch.arange(16) % 4
    model = nn.Sequential(build_backbone("cnn_small", 32, 1, 16, width=8), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert (logits.argmax(1) == y).all()


def test_runs_under_cpu_autocast() -> None:
    model = build_backbone("r18", 512, 3, 32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 512) and torch.isfinite(y.float()).all()


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone("resnet9000", 128, 1, 32)
    for name in ("cnn_small", "r18", "r34", "r50", "r100"):
        assert name in str(err.value)
    assert set(BACKBONES) == {"cnn_small", "r18", "r34", "r50", "r100"}
    with torch.device("meta"):
        assert isinstance(build_backbone("r34", 512, 3, 112), IResNet)

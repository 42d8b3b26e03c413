"""Torch-only augmentation: exact geometry checks and seeded determinism."""

import numpy as np
import pytest
import torch

from launch.data.transforms import (BatchRandomAffine, Compose, RandomAffine, RandomHorizontalFlip, affine,
                                    build_batch_transform, build_transform, to_float)


def test_to_float_layouts_and_values():
    grey = np.array([[0, 255], [51, 204]], np.uint8)
    x = to_float(grey)
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32
    expected = torch.tensor([[[-1.0, 1.0], [-0.6, 0.6]]])
    assert torch.allclose(x, expected, atol=1e-6)
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (0, 255, 51)
    y = to_float(rgb)
    assert y.shape == (3, 2, 3)
    assert torch.allclose(y[:, 0, 0], torch.tensor([-1.0, 1.0, -0.6]), atol=1e-6)
    assert torch.equal(to_float(torch.from_numpy(grey)), x)
    with pytest.raises(TypeError):
        to_float(grey.astype(np.float32))


def image(c=1, h=12, w=12, seed=0):
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identity_is_exact():
    x = image(3)
    assert torch.allclose(affine(x), x, atol=1e-5)


@pytest.mark.parametrize("h,w", [(12, 12), (8, 16)])
def test_integer_shift_moves_pixels_and_fills(h, w):
    x = image(2, h, w)
    out = affine(x, shift=(3, 2), fill=-1.0)  # 3 right, 2 down
    expected = torch.full_like(x, -1.0)
    expected[:, 2:, 3:] = x[:, : h - 2, : w - 3]
    assert torch.allclose(out, expected, atol=1e-5)


def test_rotation_90_is_counter_clockwise():
    x = torch.full((1, 8, 8), -1.0)
    x[0, 0, 7] = 1.0  # top-right corner pixel
    out = affine(x, angle_deg=90)
    assert out[0, 0, 0].item() == pytest.approx(1.0, abs=1e-5)  # -> top-left
    assert torch.allclose(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    y = image(1, 8, 8)
    assert torch.allclose(affine(y, angle_deg=-90), torch.rot90(y, -1, dims=(-2, -1)), atol=1e-5)


def test_rotation_90_non_square_moves_marker_in_pixels():
    x = torch.full((1, 9, 15), -1.0)  # centre pixel (4, 7)
    x[0, 4, 10] = 1.0  # 3 px right of the centre
    out = affine(x, angle_deg=90)
    assert out[0, 1, 7].item() == pytest.approx(1.0, abs=1e-5)  # 3 px above the centre
    assert (out > -1 + 1e-4).sum().item() == 1


def test_rotation_180_non_square_keeps_aspect():
    x = image(1, 6, 10)
    assert torch.allclose(affine(x, angle_deg=180), x.flip(-1).flip(-2), atol=1e-5)


def test_flip_and_scale():
    x = image(3, 9, 7)
    assert torch.allclose(affine(x, flip=True), x.flip(-1), atol=1e-5)
    sq = torch.full((1, 16, 16), -1.0)
    sq[0, 6:10, 6:10] = 1.0  # 4x4 centred block
    big = affine(sq, scale=2.0)
    ink = (big > 0).sum().item()
    assert 56 <= ink <= 72  # ~8x8 = 64 pixels after zooming in by 2
    assert (big[0, 4:12, 4:12] > -1).all() and big[0, :3].max() == -1


def test_random_affine_deterministic_with_generator():
    t = RandomAffine(max_shift=0.1, scale=(0.8, 1.2), max_rotate_deg=15, hflip_p=0.5)
    x = image(1, 16, 16)
    a = t(x, generator=torch.Generator().manual_seed(7))
    b = t(x, generator=torch.Generator().manual_seed(7))
    c = t(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1


def test_random_affine_zero_range_is_identity_and_flip_rate():
    x = image(1, 8, 8)
    t = RandomAffine(max_shift=0, scale=(1, 1), max_rotate_deg=0, hflip_p=0)
    assert torch.equal(t(x, generator=torch.Generator().manual_seed(0)), x)
    g = torch.Generator().manual_seed(0)
    flip = RandomHorizontalFlip(0.5)
    flips = sum(torch.equal(flip(x, generator=g), x.flip(-1)) for _ in range(400))
    assert 160 <= flips <= 240


def test_build_transform_kinds():
    assert build_transform("glyph", train=False) is None
    glyph = build_transform("glyph")
    assert isinstance(glyph, RandomAffine) and glyph.hflip_p == 0.0
    face = build_transform("face")
    x = image(3, 8, 8)
    outs = {torch.equal(face(x, generator=torch.Generator().manual_seed(s)), x) for s in range(20)}
    assert outs == {True, False}  # faces are flipped some of the time
    with pytest.raises(ValueError):
        build_transform("audio")
    comp = Compose([RandomHorizontalFlip(1.0), RandomHorizontalFlip(1.0)])
    assert torch.equal(comp(x), x)


def test_build_transform_takes_the_flip_probability():
    assert build_transform("glyph").hflip_p == 0.0 and build_transform("glyph", hflip_p=0.5).hflip_p == 0.5
    assert build_transform("face").p == 0.5 and build_transform("face", hflip_p=0.0).p == 0.0
    assert build_transform("glyph", train=False, hflip_p=0.5) is None


def test_batch_affine_equals_the_per_image_affine():
    """The batched resampling gives, image by image, what affine() gives for the drawn parameters."""
    t = BatchRandomAffine(max_shift=0.1, scale=(0.8, 1.2), max_rotate_deg=15, hflip_p=0.5)
    x = torch.rand(24, 2, 12, 10, generator=torch.Generator().manual_seed(3)) * 2 - 1
    p = t.draw(24, 12, 10, torch.Generator().manual_seed(5))
    assert 0 < int(p["flip"].sum()) < 24 and float(p["angle"].abs().max()) <= 15
    assert float(p["dx"].abs().max()) <= 0.1 * 10 and float(p["dy"].abs().max()) <= 0.1 * 12
    out = t.apply(x, p)
    for i in range(24):
        ref = affine(x[i], float(p["angle"][i]), float(p["scale"][i]), (float(p["dx"][i]), float(p["dy"][i])),
                     bool(p["flip"][i]), -1.0).clamp(-1, 1)
        assert torch.allclose(out[i], ref, atol=1e-6), i
    assert torch.equal(t(x, generator=torch.Generator().manual_seed(5)), out)  # seeded: reproducible
    assert not torch.equal(t(x, generator=torch.Generator().manual_seed(6)), out)
    assert x.min() >= -1  # the caller's batch is not modified in place
    assert torch.equal(x, torch.rand(24, 2, 12, 10, generator=torch.Generator().manual_seed(3)) * 2 - 1)


def test_batch_affine_stroke_jitter_makes_strokes_bolder_and_lighter():
    """stroke > 0 blends toward the 3x3 dilation (a > 0) or erosion (a < 0) of bright strokes."""
    x = torch.full((2, 1, 9, 9), -1.0)
    x[:, :, 4, 2:7] = 1.0  # one bright horizontal stroke, 1 px wide
    t = BatchRandomAffine(max_shift=0, scale=(1, 1), max_rotate_deg=0, stroke=1.0)
    p = t.draw(2, 9, 9)
    p["stroke"] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = t.apply(x, p)
    bold = torch.nn.functional.max_pool2d(x, 3, 1, 1)
    assert torch.allclose(out[0], bold[0], atol=1e-6)  # fully bold: the 3-px wide dilation
    assert (out[0] > -1).sum() == 21 and out[1].max() == -1  # erosion removes a 1-px stroke
    p["stroke"] = torch.tensor([0.5, 0.0], dtype=torch.float64)
    half = t.apply(x, p)
    assert torch.allclose(half[0], (x[0] + bold[0]) / 2, atol=1e-6) and torch.allclose(half[1], x[1], atol=1e-6)
    with pytest.raises(ValueError, match="stroke"):
        BatchRandomAffine(stroke=1.5)


def test_build_batch_transform_kinds():
    assert build_batch_transform("glyph", train=False) is None and build_batch_transform("face") is None
    g = build_batch_transform("glyph", hflip_p=0.5, stroke=0.3)
    assert isinstance(g, BatchRandomAffine) and g.hflip_p == 0.5 and g.stroke == 0.3
    assert g(torch.zeros(3, 1, 8, 8)).shape == (3, 1, 8, 8)

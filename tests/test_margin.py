import math

import pytest
import torch

from partialfc import CombinedMargin
from tests.oracle import reference_psi

THETA = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)[1:-1]  # avoid the clamped poles


@pytest.mark.parametrize("margin", [
    CombinedMargin.arcface(), CombinedMargin.cosface(), CombinedMargin.sphereface(m=1.7),
    CombinedMargin.sphereface(m=4), CombinedMargin(m1=1.35, m2=0.25, m3=0.1),
    CombinedMargin(m1=0.9, m2=0.3, m3=0.2), CombinedMargin.arcface(extension="linear"),
    CombinedMargin(m1=1.5, m2=0.2, extension="none"), CombinedMargin.softmax()])
def test_psi_and_exact_derivative(margin):
    """psi matches the reference formula; d psi / d cos matches autograd through acos."""
    cos = torch.cos(THETA).requires_grad_()
    ref = reference_psi(torch.acos(cos), margin.m1, margin.m2, margin.m3, margin.extension)
    (ref_grad,) = torch.autograd.grad(ref.sum(), cos)
    psi, dpsi = margin.psi_and_grad(cos.detach())
    torch.testing.assert_close(psi, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpsi, ref_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("margin", [CombinedMargin.arcface(), CombinedMargin.sphereface(m=1.7),
                                    CombinedMargin(m1=2.5, m2=0.4, m3=0.2)])
def test_monotonic_and_continuous(margin):
    """The default extension is continuous and strictly decreasing on [0, pi]."""
    psi = margin.psi(torch.cos(torch.linspace(0, math.pi, 20001, dtype=torch.float64)))
    steps = psi[1:] - psi[:-1]
    assert bool((steps < 0).all())
    assert float(steps.abs().max()) < 1e-2  # no jumps


def test_linear_extension_decreases_with_a_jump():
    """Classic ArcFace's linear branch keeps psi decreasing but jumps at theta = pi - m."""
    m = 0.5
    psi = CombinedMargin.arcface(m=m, extension="linear").psi(torch.cos(torch.linspace(0, math.pi, 20001, dtype=torch.float64)))
    assert bool((psi[1:] - psi[:-1] < 0).all())
    assert float((psi[1:] - psi[:-1]).abs().max()) == pytest.approx(math.cos(m) + m * math.sin(m) - 1, abs=1e-3)


def test_none_extension_is_not_monotonic():
    """'none' reproduces insightface's cos(theta + m): it turns back up past theta = pi - m."""
    psi = CombinedMargin(m2=0.5, extension="none").psi(torch.cos(THETA))
    assert float(psi[-1]) > float(psi.min())


def test_cos_at_poles_gives_finite_gradient():
    psi, dpsi = CombinedMargin.arcface().psi_and_grad(torch.tensor([1.0, -1.0, 1.0 + 1e-7], dtype=torch.float32))
    assert bool(torch.isfinite(psi).all()) and bool(torch.isfinite(dpsi).all())


def test_straight_through_derivative_is_one():
    margin = CombinedMargin.arcface(straight_through=True)
    psi, dpsi = margin.psi_and_grad(torch.cos(THETA))
    torch.testing.assert_close(psi, CombinedMargin.arcface().psi(torch.cos(THETA)))
    assert bool((dpsi == 1).all())


def test_presets():
    assert CombinedMargin.arcface(s=32, m=0.3) == CombinedMargin(s=32, m1=1, m2=0.3, m3=0)
    assert CombinedMargin.cosface(s=30, m=0.35) == CombinedMargin(s=30, m1=1, m2=0, m3=0.35)
    assert CombinedMargin.sphereface(s=30, m=1.7) == CombinedMargin(s=30, m1=1.7, m2=0, m3=0)


@pytest.mark.parametrize("kwargs,word", [
    (dict(s=0), "s"), (dict(s=-1), "s"), (dict(m1=0), "m1"), (dict(m2=-0.1), "m2"), (dict(m3=-0.1), "m3"),
    (dict(m2=4.0), "m2"), (dict(m1=2, extension="linear"), "linear"), (dict(extension="bogus"), "extension"),
    (dict(s=float("nan")), "s")])
def test_invalid_parameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        CombinedMargin(**kwargs)


def test_margin_is_immutable():
    with pytest.raises(Exception):
        CombinedMargin().s = 1.0


@pytest.mark.parametrize("margin", [CombinedMargin.arcface(m=0.5), CombinedMargin.sphereface(m=1.7),
                                    CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2)])
def test_gradient_clamp_is_where_and_what_the_readme_says(margin):
    """README: dpsi/dcos is exact unless sin(theta) < 1e-3, and there it is the exact value times
    sin(theta) / 1e-3. Oracle: autograd through acos in float64."""
    theta = torch.tensor([5e-4, 9e-4, 1.2e-3, 0.1, math.pi - 5e-4], dtype=torch.float64)
    cos = torch.cos(theta).requires_grad_(True)
    psi_ref = reference_psi(torch.acos(cos), margin.m1, margin.m2, margin.m3, margin.extension)
    exact = torch.autograd.grad(psi_ref.sum(), cos)[0]
    _, dpsi = margin.psi_and_grad(torch.cos(theta))
    factor = torch.clamp(torch.sin(theta) / 1e-3, max=1.0)
    torch.testing.assert_close(dpsi, exact * factor, rtol=1e-6, atol=0)
    assert (factor[2:4] == 1).all()  # outside the clamp the gradient is exact

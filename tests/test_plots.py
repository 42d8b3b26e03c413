"""Tests for launch.plots: PNG files are written and contain a real figure."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from launch.plots import (
    plot_curves,
    plot_margin_curves,
    plot_theta_distributions,
    reference_margin_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path, min_bytes: int = 5_000) -> np.ndarray:
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    img = mpimg.imread(str(path))  # (H, W, 4) floats
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


def test_plot_curves(tmp_path) -> None:
    history = [
        {"step": s, "loss": 5.0 * math.exp(-s / 300), "lr": 0.1 * (1 - s / 1000)}
        for s in range(0, 1000, 10)
    ]
    history[3]["loss"] = float("nan")  # skipped, not fatal
    history += [{"step": s, "eval_acc": 0.5 + s / 2500} for s in range(0, 1000, 200)]
    path = plot_curves(history, tmp_path / "sub" / "curves.png")
    img = assert_real_png(path)
    assert img.shape[1] > img.shape[0]  # three panels side by side


def test_plot_curves_loss_only_and_empty(tmp_path) -> None:
    assert_real_png(plot_curves([{"loss": 1.0 / (i + 1)} for i in range(50)], tmp_path / "a.png"))
    data = open(plot_curves([], tmp_path / "empty.png"), "rb").read()
    assert data[:8] == PNG_MAGIC


def test_plot_theta_distributions(tmp_path) -> None:
    rng = np.random.default_rng(0)
    snaps = {
        s: np.clip(rng.normal(np.pi / 2 - s / 2000, 0.15, 512), 0, np.pi)
        for s in (0, 500, 1000, 2000)
    }
    assert_real_png(plot_theta_distributions(snaps, tmp_path / "theta.png"))
    deg = {0: np.degrees(snaps[0])}
    assert_real_png(plot_theta_distributions(deg, tmp_path / "theta_deg.png", in_degrees=True))


def test_plot_margin_curves(tmp_path) -> None:
    from partialfc import CombinedMargin
    margins = reference_margin_curves(CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2))
    assert_real_png(plot_margin_curves(margins, tmp_path / "margins.png"))


def test_reference_margin_formulas() -> None:
    """One definition of each margin (CombinedMargin): the curves follow the papers' formulas,
    written out here independently."""
    from partialfc import CombinedMargin
    m = reference_margin_curves(CombinedMargin(s=64.0, m1=1.2, m2=0.3, m3=0.1))
    t = np.array([0.0, math.pi / 3, math.pi / 2])
    curves = dict(zip(["softmax", "arc", "cos", "sphere", "configured"], m.values()))
    assert curves["softmax"](t) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert curves["arc"](t) == pytest.approx([math.cos(0.5), math.cos(math.pi / 3 + 0.5), -math.sin(0.5)])
    assert curves["cos"](t) == pytest.approx([0.6, 0.1, -0.4], abs=1e-12)
    assert curves["sphere"](t)[:2] == pytest.approx([1.0, math.cos(1.7 * math.pi / 3)])
    # past 1.7 theta = pi SphereFace continues monotonically: -cos(1.7 theta) - 2
    assert curves["sphere"](np.array([2.0]))[0] == pytest.approx(-math.cos(1.7 * 2.0) - 2.0)
    assert curves["configured"](t)[2] == pytest.approx(math.cos(1.2 * math.pi / 2 + 0.3) - 0.1)

"""Tests for launch.figures: the command writes real PNGs, the boundaries match closed forms computed
here without the module's code, and the toy run of the real head shows what a margin does."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from launch.figures import (ToyConfig, angular_spread, boundary_cos, boundary_margins, boundary_theta,
                            decision_regions, toy_margins, train_toy)
from partialfc import CombinedMargin

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_real_png(path, min_bytes: int = 20_000) -> np.ndarray:
    """A PNG by its magic bytes, of some size, and not a blank canvas; returns the image."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    img = mpimg.imread(str(path))
    assert img.shape[0] > 300 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.05
    return img


@pytest.fixture(scope="module")
def command_run(tmp_path_factory):
    """``python -m launch.figures --out DIR`` run once, as a user would."""
    out = tmp_path_factory.mktemp("figures")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "launch.figures", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_command_writes_real_pngs(command_run) -> None:
    out, stdout = command_run
    assert sorted(os.listdir(out)) == ["decision_boundaries.png", "toy_features.png"]
    for name in ("decision_boundaries.png", "toy_features.png"):
        img = assert_real_png(out / name)
        assert img.shape[1] > 2 * img.shape[0]  # one column per margin
    for name in toy_margins():
        assert name in stdout


# --- boundaries against closed forms ------------------------------------------------------------
def test_arcface_boundary_in_theta_plane_is_a_shifted_diagonal() -> None:
    m = 0.5
    theta1 = np.linspace(0.0, math.pi, 1000)
    got = boundary_theta(CombinedMargin.arcface(m=m), theta1)
    inside = theta1 < math.pi - m - 1e-9
    np.testing.assert_allclose(got[inside], theta1[inside] + m, atol=1e-6)
    assert np.isnan(got[theta1 > math.pi - m + 1e-9]).all()  # class 1 has no region there


def test_sphereface_boundary_in_theta_plane_is_a_line_through_the_origin() -> None:
    m = 1.7
    theta1 = np.linspace(0.0, math.pi, 1000)
    got = boundary_theta(CombinedMargin.sphereface(m=m), theta1)
    inside = theta1 < math.pi / m - 1e-9
    np.testing.assert_allclose(got[inside], m * theta1[inside], atol=1e-6)
    assert np.isnan(got[theta1 > math.pi / m + 1e-9]).all()


def test_cosface_boundary_in_cos_plane_is_a_shifted_diagonal() -> None:
    m = 0.4
    cos1 = np.linspace(-1.0, 1.0, 1000)
    got = boundary_cos(CombinedMargin.cosface(m=m), cos1)
    inside = cos1 > -1.0 + m + 1e-9
    np.testing.assert_allclose(got[inside], cos1[inside] - m, atol=1e-12)
    assert np.isnan(got[cos1 < -1.0 + m - 1e-9]).all()


def test_combined_boundary_matches_closed_form() -> None:
    m1, m2, m3 = 1.0, 0.3, 0.2
    theta1 = np.linspace(0.0, math.pi - m2 - 1e-6, 500)
    psi = np.cos(theta1 + m2) - m3
    ok = psi >= -1.0
    got = boundary_theta(CombinedMargin(s=64, m1=m1, m2=m2, m3=m3), theta1)
    np.testing.assert_allclose(got[ok], np.arccos(psi[ok]), atol=1e-6)
    assert np.isnan(got[~ok]).all()


def test_regions_match_closed_forms() -> None:
    theta_axis, arc = decision_regions(CombinedMargin.arcface(m=0.5), "theta")
    t1, t2 = np.meshgrid(theta_axis, theta_axis)  # columns: theta1, rows: theta2
    expected = np.where(t2 > t1 + 0.5, 1, np.where(t1 > t2 + 0.5, 2, 0))
    np.testing.assert_array_equal(arc, expected)

    cos_axis, cosface = decision_regions(CombinedMargin.cosface(m=0.4), "cos")
    c1, c2 = np.meshgrid(cos_axis, cos_axis)
    expected = np.where(c1 - 0.4 > c2, 1, np.where(c2 - 0.4 > c1, 2, 0))
    np.testing.assert_array_equal(cosface, expected)


def test_softmax_has_no_margin_band() -> None:
    axis, region = decision_regions(CombinedMargin.softmax(), "theta")
    off_diagonal = ~np.eye(len(axis), dtype=bool)
    assert (region[off_diagonal] != 0).all()


def test_boundary_margins_are_the_heads_presets_plus_a_combined_one() -> None:
    margins = boundary_margins()
    refs = CombinedMargin.references()
    assert {k: margins[k] for k in refs} == refs
    (extra,) = set(margins) - set(refs)
    assert margins[extra] == CombinedMargin(s=64, m1=1.0, m2=0.3, m3=0.2)


# --- toy run of the real head -------------------------------------------------------------------
def _printed_spreads(stdout: str) -> dict[str, tuple[float, float]]:
    """``{margin name: (spread in degrees, train accuracy)}`` from the command's report lines."""
    rows = {}
    for line in stdout.splitlines():
        if " spread " in line:
            name, rest = line.split(" spread ")
            rows[name.strip()] = (float(rest.split()[0]), float(rest.split()[-1]))
    return rows


def test_command_run_shows_margins_compacting_classes(command_run) -> None:
    rows = _printed_spreads(command_run[1])
    assert set(rows) == set(toy_margins())
    softmax = rows["softmax"][0]
    for name in ("ArcFace m=0.5", "CosFace m=0.4", "combined m1=1 m2=0.3 m3=0.2"):
        assert rows[name][0] < 0.7 * softmax, name  # measured 2.3, 2.4, 2.0 against 6.7 degrees
        assert rows[name][1] >= 0.95, name
    assert rows["SphereFace m=1.7"][0] < softmax  # weakest margin at small angles: 4.9 degrees


def test_arcface_makes_classes_more_compact_than_softmax_another_seed() -> None:
    cfg = ToyConfig(seed=1)
    margins = toy_margins(cfg.s)
    softmax = train_toy(margins["softmax"], cfg)
    arcface = train_toy(margins["ArcFace m=0.5"], cfg)
    assert arcface.accuracy >= 0.95
    assert arcface.spread_deg < 0.7 * softmax.spread_deg  # measured 3.0 against 7.1 degrees
    assert arcface.features.shape == (cfg.num_classes * cfg.per_class, 2)
    assert arcface.centers.shape == (cfg.num_classes, 2)


def test_toy_run_is_deterministic() -> None:
    cfg = ToyConfig(steps=30)
    a, b = (train_toy(CombinedMargin.arcface(s=cfg.s), cfg) for _ in range(2))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.centers, b.centers)


def test_angular_spread_of_known_angles() -> None:
    import torch

    angles = torch.tensor([-0.1, 0.1, math.pi / 2 - 0.2, math.pi / 2 + 0.2], dtype=torch.float64)
    features = 3.0 * torch.stack([angles.cos(), angles.sin()], dim=1)  # the norm must not matter
    labels = torch.tensor([0, 0, 1, 1])
    assert angular_spread(features, labels) == pytest.approx(math.degrees(0.15))

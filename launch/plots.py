"""Training and margin figures (matplotlib, Agg backend, PNG files).

* :func:`plot_curves` - loss, accuracy and learning rate against step.
* :func:`plot_theta_distributions` - histograms of the target angle theta_y.
* :func:`plot_margin_curves` - target logit / s against theta for margin variants.
* :func:`reference_margin_curves` - the usual softmax / ArcFace / CosFace /
  SphereFace curves plus a configured margin, from ``partialfc.CombinedMargin``.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_curves",
    "plot_margin_curves",
    "plot_theta_distributions",
    "reference_margin_curves",
]

_DPI = 120


def _prepare(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _save(fig: "plt.Figure", path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=_DPI)
    plt.close(fig)
    return path


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold a finite number under ``key``."""
    xs, ys = [], []
    for i, rec in enumerate(history):
        v = rec.get(key)
        if _is_number(v) and math.isfinite(float(v)):
            xs.append(float(rec.get("step", i)))
            ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def _keys(history: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in history:
        for k, v in rec.items():
            if k != "step" and _is_number(v):
                seen.setdefault(k, None)
    return list(seen)


def plot_curves(history: list[dict], path: str | os.PathLike) -> str:
    """Plot training curves from per-step records and save a PNG.

    Each record is a dict such as ``{"step": 100, "loss": 2.3, "lr": 0.1}``;
    eval records may appear only every few steps, e.g. ``{"step": 500,
    "eval_acc": 0.91}``.  A missing ``step`` defaults to the record's index.
    Panels (each drawn only if it has data): every numeric key containing
    ``"loss"``; every key containing ``"acc"`` (markers, as they are sparse);
    ``"lr"`` (log scale when positive).  Other numeric keys are ignored.

    Returns:
        ``path``.
    """
    path = _prepare(path)
    keys = _keys(history)
    groups = [
        ("loss", [k for k in keys if "loss" in k.lower()], False),
        ("accuracy", [k for k in keys if "acc" in k.lower()], True),
        ("learning rate", [k for k in keys if k.lower() == "lr"], False),
    ]
    panels = [(title, ks, sparse) for title, ks, sparse in groups if ks]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.8))
    axes = np.atleast_1d(axes)
    if not panels:
        axes[0].text(0.5, 0.5, "no numeric series in history", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, ks, sparse) in zip(axes, panels):
        for k in ks:
            x, y = _series(history, k)
            if x.size:
                ax.plot(x, y, marker="o" if sparse else None, markersize=3, label=k)
        if title == "learning rate":
            _, lr = _series(history, ks[0])
            if lr.size and np.all(lr > 0):
                ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(ks) > 1 or title != "learning rate":
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_theta_distributions(
    snapshots: Mapping[int, np.ndarray],
    path: str | os.PathLike,
    in_degrees: bool = False,
    bins: int = 90,
) -> str:
    """Overlay histograms of the target angle theta_y at several training steps.

    Args:
        snapshots: ``{step: theta_y}`` with ``theta_y`` a ``(B,)`` array of the
            angle between each sample's feature and its class centre, in
            radians (or degrees if ``in_degrees``).
        path: output PNG.
        in_degrees: the arrays are already in degrees.
        bins: number of bins over [0, 180] degrees.

    Returns:
        ``path``.
    """
    path = _prepare(path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    edges = np.linspace(0.0, 180.0, bins + 1)
    steps = sorted(snapshots)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(steps), 1)))
    for color, step in zip(colors, steps):
        theta = np.asarray(snapshots[step], dtype=np.float64).reshape(-1)
        theta = theta[np.isfinite(theta)]
        deg = theta if in_degrees else np.degrees(theta)
        if deg.size == 0:
            continue
        ax.hist(
            deg,
            bins=edges,
            density=True,
            histtype="step",
            linewidth=1.5,
            color=color,
            label=f"step {step} (mean {deg.mean():.1f}°)",
        )
    ax.axvline(90.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0.0, 180.0)
    ax.set_xlabel(r"target angle $\theta_y$ (degrees)")
    ax.set_ylabel("density")
    ax.set_title(r"distribution of $\theta_y$ during training")
    if steps:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_margin_curves(
    margins: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    path: str | os.PathLike,
    n_points: int = 721,
) -> str:
    """Plot target logit / s against theta_y for several margin functions.

    Args:
        margins: ``{name: f}`` where ``f`` maps an array of angles in radians
            over ``[0, pi]`` to the target logit divided by the scale ``s``
            (e.g. ``cos(theta + 0.5)`` for ArcFace).
        path: output PNG.
        n_points: samples of theta.

    Returns:
        ``path``.
    """
    path = _prepare(path)
    theta = np.linspace(0.0, math.pi, n_points)  # (T,) radians
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, f in margins.items():
        y = np.broadcast_to(np.asarray(f(theta), dtype=np.float64), theta.shape)
        ax.plot(np.degrees(theta), y, label=name)
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlim(0.0, 180.0)
    ax.set_xlabel(r"$\theta_y$ (degrees)")
    ax.set_ylabel("target logit / s")
    ax.set_title("margin functions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reference_margin_curves(configured=None, label: str = "configured") -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """``{name: f(theta)}`` for :func:`plot_margin_curves`: the target logit over ``s`` of the usual
    margins (``CombinedMargin.references()``: softmax, ArcFace, CosFace, SphereFace at their presets)
    and, if given, a ``configured`` :class:`partialfc.CombinedMargin` — one definition of each
    margin, the same the head trains with (monotonic extension included)."""
    import torch
    from partialfc import CombinedMargin

    margins = dict(CombinedMargin.references())
    if configured is not None:
        margins[label] = configured
    return {name: (lambda mm: lambda t: mm.psi(torch.cos(torch.as_tensor(t, dtype=torch.float64))).numpy())(m)
            for name, m in margins.items()}

"""``python -m launch.figures --out docs/figures``: the two margin pictures that training does not draw.

* ``decision_boundaries.png`` - the two-class decision boundaries of softmax, ArcFace, CosFace,
  SphereFace and a combined margin, in the angle plane (theta1, theta2) and in the cosine plane
  (cos theta1, cos theta2). Class 1 wins where ``psi(theta1) > cos(theta2)`` (``s`` cancels), class 2
  where ``psi(theta2) > cos(theta1)``; with a margin the two boundaries part and the band between
  them belongs to neither class. ``psi`` is :meth:`partialfc.CombinedMargin.psi`, the head's own.
* ``toy_features.png`` - a few seconds of training of the real :class:`partialfc.PartialFC` head
  (one process, no group) on 2-D features of a small MLP, 8 synthetic classes: the normalised
  features on the unit circle, one panel per margin, class centres (the head's rows) as arrows.

Everything is seeded and runs on one CPU thread in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from partialfc import CombinedMargin, PartialFC  # noqa: E402

__all__ = ["ToyConfig", "ToyResult", "angular_spread", "boundary_cos", "boundary_margins", "boundary_theta",
           "decision_regions", "main", "make_figures", "plot_decision_boundaries", "plot_toy_features",
           "toy_margins", "train_toy"]

_DPI = 120
_GRID = 401  # samples per axis of the region shading


# --- decision boundaries ------------------------------------------------------------------------
def _psi(margin: CombinedMargin, cos: np.ndarray) -> np.ndarray:
    """``margin.psi`` on a numpy array of cosines, in float64."""
    return margin.psi(torch.as_tensor(np.asarray(cos, dtype=np.float64))).numpy()


def boundary_cos(margin: CombinedMargin, cos1: np.ndarray) -> np.ndarray:
    """Class 1's boundary in the cosine plane: ``cos theta2 = psi(theta1)`` at each ``cos theta1``;
    NaN where ``psi < -1`` (no ``theta2`` loses to class 1 there: class 1 has no region)."""
    y = _psi(margin, cos1)
    return np.where(y >= -1.0, y, np.nan)


def boundary_theta(margin: CombinedMargin, theta1: np.ndarray) -> np.ndarray:
    """Class 1's boundary in the angle plane: ``theta2 = arccos(psi(theta1))`` (radians); NaN where
    class 1 has no region. Class 2's boundary is the mirror image (swap the axes)."""
    return np.arccos(np.clip(boundary_cos(margin, np.cos(theta1)), -1.0, 1.0))  # NaN stays NaN


def decision_regions(margin: CombinedMargin, plane: str, n: int = _GRID):
    """``(axis, region)`` on an ``n x n`` grid of ``plane`` ("theta": [0, pi]^2, "cos": [-1, 1]^2).

    ``region[i, j]`` (row i: class 2's coordinate ``axis[i]``, column j: class 1's ``axis[j]``) is
    1 where class 1 wins with its margin, 2 where class 2 does, 0 in the margin band (neither).
    """
    axis = np.linspace(0.0, math.pi, n) if plane == "theta" else np.linspace(-1.0, 1.0, n)
    cos = np.cos(axis) if plane == "theta" else axis
    psi = _psi(margin, cos)  # psi depends on one coordinate only: n values, not n^2
    wins1 = psi[None, :] > cos[:, None]  # psi(theta1) > cos theta2
    wins2 = psi[:, None] > cos[None, :]  # psi(theta2) > cos theta1
    return axis, np.where(wins1, 1, np.where(wins2, 2, 0))


def boundary_margins() -> dict[str, CombinedMargin]:
    """The margins of the boundary figure: ``CombinedMargin.references()`` plus a combined one."""
    margins = dict(CombinedMargin.references())
    combined = CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2)
    margins[_combined_name(combined)] = combined
    return margins


def _combined_name(m: CombinedMargin) -> str:
    return f"combined m1={m.m1:g} m2={m.m2:g} m3={m.m3:g}"


def _draw_boundaries(ax, margin: CombinedMargin, plane: str) -> None:
    """Shade the regions of one margin and draw both classes' boundaries on ``ax``."""
    axis, region = decision_regions(margin, plane)
    lo, hi = axis[0], axis[-1]
    cmap = matplotlib.colors.ListedColormap(["#f2f2f2", "#c6dbef", "#fdd0a2"])  # band, class 1, class 2
    ax.imshow(region, origin="lower", extent=(lo, hi, lo, hi), cmap=cmap, vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    x = np.linspace(lo, hi, 1001)
    y = boundary_theta(margin, x) if plane == "theta" else boundary_cos(margin, x)
    ax.plot(x, y, color="tab:blue", lw=1.6, label="class 1 boundary")
    ax.plot(y, x, color="tab:orange", lw=1.6, label="class 2 boundary")
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.6, ls=":")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    if plane == "theta":
        ax.set_xticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
        ax.set_yticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
        ax.set_xlabel(r"$\theta_1$")
        ax.set_ylabel(r"$\theta_2$")
    else:
        ax.set_xlabel(r"$\cos\theta_1$")
        ax.set_ylabel(r"$\cos\theta_2$")


def plot_decision_boundaries(margins: Mapping[str, CombinedMargin], path: str | os.PathLike) -> str:
    """One column per margin: regions and boundaries in the angle plane (top) and the cosine plane
    (bottom). Blue: class 1 wins, orange: class 2 wins, grey: the margin band. Returns ``path``."""
    path = _prepare(path)
    fig, axes = plt.subplots(2, len(margins), figsize=(3.4 * len(margins), 7.2), squeeze=False)
    for col, (name, margin) in enumerate(margins.items()):
        for row, plane in enumerate(("theta", "cos")):
            _draw_boundaries(axes[row, col], margin, plane)
        axes[0, col].set_title(name, fontsize=10)
    axes[0, 0].legend(loc="upper left", fontsize=7, framealpha=0.9)
    fig.suptitle("two-class decision boundaries: class 1 wins where ψ(θ1) > cos θ2, class 2 where ψ(θ2) > "
                 "cos θ1 (grey band: neither; ArcFace's is of constant width in θ, CosFace's in cos θ)",
                 fontsize=10)
    return _save(fig, path)


# --- toy run of the real head --------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    """Synthetic data and training of the toy run: ``num_classes`` Gaussian clusters in ``input_dim``
    dimensions (unit-variance centres, ``noise`` per coordinate), an MLP to 2-D, full-batch Adam
    with a cosine-decayed learning rate; ``s`` is the scale of every margin (modest: 2-D features)."""

    s: float = 16.0
    num_classes: int = 8
    per_class: int = 100
    input_dim: int = 16
    noise: float = 1.0
    hidden: int = 64
    steps: int = 500
    lr: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class ToyResult:
    """Learned features ``(N, 2)``, labels ``(N,)``, class centres ``(C, 2)`` (the head's rows),
    mean intra-class angle ``spread_deg`` and training accuracy of one toy run."""

    features: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    spread_deg: float
    accuracy: float


def toy_margins(s: float = ToyConfig.s) -> dict[str, CombinedMargin]:
    """The boundary figure's margins with the scale set to ``s`` (a modest scale suits 2-D)."""
    return {name: dataclasses.replace(m, s=s) for name, m in boundary_margins().items()}


def _toy_data(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(C * per_class, input_dim)`` and labels, from the seed alone."""
    g = torch.Generator().manual_seed(cfg.seed)
    means = torch.randn(cfg.num_classes, cfg.input_dim, generator=g)
    labels = torch.arange(cfg.num_classes).repeat_interleave(cfg.per_class)
    x = means[labels] + cfg.noise * torch.randn(labels.numel(), cfg.input_dim, generator=g)
    return x, labels


def angular_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean angle (degrees) between each feature and the mean direction of its class."""
    u = F.normalize(features.double(), dim=1)
    angles = []
    for c in labels.unique():
        members = u[labels == c]
        centre = F.normalize(members.mean(0), dim=0)
        angles.append(torch.acos((members @ centre).clamp(-1.0, 1.0)))
    return math.degrees(torch.cat(angles).mean().item())


@contextlib.contextmanager
def _one_thread():
    """Run torch on one CPU thread inside the block (tiny matrices: threads only add contention and
    change the summation order), then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_toy(margin: CombinedMargin, cfg: ToyConfig = ToyConfig()) -> ToyResult:
    """Train an MLP (input_dim -> hidden -> 2) with ``PartialFC(2, C, margin)`` as its loss, on one
    CPU thread: the same seed gives the same result whatever the caller's thread setting."""
    with _one_thread():
        return _train_toy(margin, cfg)


def _train_toy(margin: CombinedMargin, cfg: ToyConfig) -> ToyResult:
    torch.manual_seed(cfg.seed)
    x, labels = _toy_data(cfg)
    net = torch.nn.Sequential(torch.nn.Linear(cfg.input_dim, cfg.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(cfg.hidden, 2))
    head = PartialFC(2, cfg.num_classes, margin=margin, seed=cfg.seed, init_std=1.0)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for _ in range(cfg.steps):
        loss = head(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        features, centers = net(x), F.normalize(head.weight, dim=1)
        accuracy = (F.normalize(features, dim=1) @ centers.T).argmax(1).eq(labels).double().mean().item()
    return ToyResult(features.numpy(), labels.numpy(), centers.numpy(), angular_spread(features, labels), accuracy)


def _draw_circle(ax, result: ToyResult, title: str) -> None:
    """Normalised features on the unit circle (radius jittered for visibility), centres as arrows."""
    u = result.features / np.linalg.norm(result.features, axis=1, keepdims=True).clip(1e-12)
    radius = 1.0 - 0.15 * np.random.default_rng(0).random(len(u))  # deterministic jitter, inside the circle
    colors = plt.get_cmap("tab10")(np.arange(result.centers.shape[0]) % 10)
    ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="grey", lw=0.6))
    ax.scatter(u[:, 0] * radius, u[:, 1] * radius, s=4, c=colors[result.labels], alpha=0.6, linewidths=0)
    for c, (wx, wy) in enumerate(result.centers):
        ax.annotate("", xy=(1.18 * wx, 1.18 * wy), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color=colors[c], lw=1.4))
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\nspread {result.spread_deg:.1f}°, train acc {100 * result.accuracy:.0f}%", fontsize=9)


def plot_toy_features(results: Mapping[str, ToyResult], path: str | os.PathLike,
                      cfg: ToyConfig = ToyConfig()) -> str:
    """One unit-circle panel per margin; returns ``path``."""
    path = _prepare(path)
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.9), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        _draw_circle(ax, result, name)
    fig.suptitle(f"2-D features of a toy MLP trained with the PartialFC head: {cfg.num_classes} classes, "
                 f"s={cfg.s:g} (modest for 2-D), {cfg.steps} full-batch steps, seed {cfg.seed}; "
                 "spread = mean angle to the class mean direction, arrows = class centres (W rows)", fontsize=9)
    return _save(fig, path)


# --- command --------------------------------------------------------------------------------
def _prepare(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=_DPI)
    plt.close(fig)
    return path


def make_figures(out: str | os.PathLike, cfg: ToyConfig = ToyConfig()) -> dict:
    """Write both PNGs under ``out``; returns ``{"decision_boundaries": path, "toy_features": path,
    "toy": {name: ToyResult}}``."""
    out = os.fspath(out)
    boundaries = plot_decision_boundaries(boundary_margins(), os.path.join(out, "decision_boundaries.png"))
    toy = {name: train_toy(m, cfg) for name, m in toy_margins(cfg.s).items()}
    features = plot_toy_features(toy, os.path.join(out, "toy_features.png"), cfg)
    return {"decision_boundaries": boundaries, "toy_features": features, "toy": toy}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``--out DIR`` (default docs/figures), ``--s``, ``--steps``, ``--seed``."""
    p = argparse.ArgumentParser(prog="python -m launch.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("docs", "figures"), help="output folder")
    p.add_argument("--s", type=float, default=ToyConfig.s, help="scale of the toy run's margins")
    p.add_argument("--steps", type=int, default=ToyConfig.steps, help="toy training steps")
    p.add_argument("--seed", type=int, default=ToyConfig.seed, help="toy data / init seed")
    args = p.parse_args(argv)
    start = time.perf_counter()
    done = make_figures(args.out, ToyConfig(s=args.s, steps=args.steps, seed=args.seed))
    for name, r in done["toy"].items():
        print(f"{name:32s} spread {r.spread_deg:5.1f} deg  train acc {r.accuracy:.3f}")
    print(f"wrote {done['decision_boundaries']} and {done['toy_features']} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

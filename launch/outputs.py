"""What a finished run leaves for people: history.json and the pictures (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path

from partialfc import CombinedMargin, margin_from_config

from launch.config import TrainConfig


def write_outputs(out: Path, history, snapshots, cfg: TrainConfig, summary) -> None:
    from launch.plots import plot_curves, plot_margin_curves, plot_theta_distributions, reference_margin_curves
    with open(out / "history.json", "w") as f:
        json.dump({"history": history, "final_eval": summary}, f, indent=1)
    plot_curves(history, out / "curves.png")
    if snapshots:
        plot_theta_distributions({k: v.numpy() for k, v in sorted(snapshots.items())}, out / "theta.png")
    configured = margin_from_config(cfg.head)  # a per-row margin (AdaFace, ...) has no single curve
    configured = configured if isinstance(configured, CombinedMargin) else None
    plot_margin_curves(reference_margin_curves(configured, f"configured ({cfg.head.margin})"), out / "margins.png")

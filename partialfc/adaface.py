"""AdaFace (Kim et al., CVPR 2022): a margin that adapts per row to the embedding norm, made exact
and global for the sharded head.

Per row i of the global batch (identical on every rank, since the gathered batch is):

    n_i   = clamp(|x_i|, 0.001, 100)                       (detached: the norm steers, it is not trained)
    mean <- t_alpha * mean(n over valid rows) + (1 - t_alpha) * mean       (training mode, once per forward)
    std  <- t_alpha * std(n over valid rows, unbiased) + (1 - t_alpha) * std
    z_i   = clamp(h * (n_i - mean) / (std + eps), -1, 1)
    theta = acos(clamp(cos_y, -1 + eps, 1 - eps))
    target logit = s * (cos(clamp(theta - m z_i, eps, pi - eps)) - (m + m z_i)),  other logits s * cos

This is the combined margin with per-row m2 = -m z_i and m3 = m + m z_i. The gradient is exact,
clamps included: d psi / d cos = sin(phi) / sin(theta) inside both clamps, 0 outside (the official
code's values; it never needs the pole clamp of :class:`CombinedMargin`).

The statistics are buffers (in ``state_dict``, the same on every rank). They advance exactly once per
forward call in training mode: never in eval mode, and never when a forward is re-run during
backward (``torch.utils.checkpoint`` around the head); the chunked path recomputes only logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class AdaFace(nn.Module):
    """AdaFace margin: ``PartialFC(d, C, margin=AdaFace(s=64.0, m=0.4, h=0.333, t_alpha=0.01))``."""

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3):
        super().__init__()
        for name, value in (("s", s), ("m", m), ("h", h), ("t_alpha", t_alpha), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AdaFace.{name} must be a finite number, got {value!r}")
        if s <= 0 or m < 0 or h < 0 or not 0 <= t_alpha <= 1 or not 0 < eps < 0.1:
            raise ValueError(f"AdaFace: need s > 0, m >= 0, h >= 0, 0 <= t_alpha <= 1, 0 < eps < 0.1; "
                             f"got s={s}, m={m}, h={h}, t_alpha={t_alpha}, eps={eps}")
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    @torch.no_grad()
    def update(self, norms: torch.Tensor, valid: torch.Tensor) -> None:
        """Advance the running statistics with the valid rows' clamped norms (B,)."""
        n = norms[valid].double()
        if n.numel() == 0:
            return
        a = self.t_alpha
        self.batch_mean.mul_(1 - a).add_(a * n.mean())
        if n.numel() > 1:  # the unbiased std of one value is undefined
            self.batch_std.mul_(1 - a).add_(a * n.std())

    def for_batch(self, x_global: torch.Tensor, valid: torch.Tensor) -> "AdaFaceRows":
        """The per-row margin of this forward: updates the statistics first (training mode, not in a
        recomputation during backward), then ``z`` from them."""
        from .softmax import safe_normalize
        with torch.no_grad():
            x = x_global.detach()
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            norms = safe_normalize(x)[1].squeeze(1).clamp(0.001, 100)  # (B,) in at least float32
            if self.training and torch._C._current_graph_task_id() == -1:
                self.update(norms, valid)
            z = (self.h * (norms.double() - self.batch_mean) / (self.batch_std + self.eps)).clamp(-1, 1)
        return AdaFaceRows(self.s, self.m, self.eps, z)


class AdaFaceRows:
    """The margin of one batch: ``s`` and ``psi_and_grad(cos_y)`` with each row's own z (B,)."""

    def __init__(self, s: float, m: float, eps: float, z: torch.Tensor):
        self.s, self.m, self.eps, self.z = s, m, eps, z

    def psi_and_grad(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(cos_t.dtype, torch.float32)
        c, z, eps = cos_t.to(dtype), self.z.to(dtype), self.eps
        cc = c.clamp(-1 + eps, 1 - eps)
        theta = torch.acos(cc)
        phi = theta - self.m * z
        phic = phi.clamp(eps, math.pi - eps)
        psi = torch.cos(phic) - (self.m + self.m * z)
        inside = (c > -1 + eps) & (c < 1 - eps) & (phi > eps) & (phi < math.pi - eps)
        dpsi = torch.where(inside, torch.sin(phic) / torch.sin(theta), torch.zeros_like(c))
        return psi, dpsi

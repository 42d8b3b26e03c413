"""CurricularFace (Huang et al., CVPR 2020) as a margin of the sharded head, exact and global.

Per row i of the global batch, with cos_y its target cosine and t a running scalar:

    t <- t_alpha * mean(cos_y over the valid rows of the global batch) + (1 - t_alpha) * t
         (detached, initial 0, updated before use, in training mode, once per forward)
    target logit   s * cos(theta_y + m)        if cos_y > cos(pi - m), else s * (cos_y - m sin m)
    negative j     s * cos_j (t + cos_j)       if cos_j > cos(theta_y + m)   (a "hard" negative)
                   s * cos_j                   otherwise

Gradients flow through the target and through cos_j (t + cos_j) with t constant. Every rank needs
each row's cos(theta_y + m) before forming its negatives, but only the rank holding the target knows
cos_y: the loss Function runs one extra all-reduce of (B,) values (never of C). Hard negatives
change the logits the backward needs, so the backward recomputes each block's logits (as the
chunked path does) instead of keeping the B x C_local buffer. Plain margins pay nothing for this.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .margin import CombinedMargin


class CurricularFace(nn.Module):
    """``PartialFC(d, C, margin=CurricularFace(s=64.0, m=0.5, t_alpha=0.01))``; ``t`` is a buffer."""

    def __init__(self, s: float = 64.0, m: float = 0.5, t_alpha: float = 0.01):
        super().__init__()
        for name, value in (("s", s), ("m", m), ("t_alpha", t_alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CurricularFace.{name} must be a finite number, got {value!r}")
        if s <= 0 or not 0 <= m < math.pi or not 0 <= t_alpha <= 1:
            raise ValueError(f"CurricularFace: need s > 0, 0 <= m < pi, 0 <= t_alpha <= 1; got s={s}, m={m}, "
                             f"t_alpha={t_alpha}")
        self.s, self.m, self.t_alpha = float(s), float(m), float(t_alpha)
        self.target_margin = CombinedMargin.arcface(s=self.s, m=self.m, extension="linear")
        self.register_buffer("t", torch.tensor(0.0, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t_alpha={self.t_alpha}"

    def for_batch(self, x_global: torch.Tensor, valid: torch.Tensor) -> "CurricularFaceRows":
        return CurricularFaceRows(self)


class _Negatives:
    """What a block needs to reshape its hard negatives: s, thr (B,) = cos(theta_y + m), t."""

    def __init__(self, s: float, thr: torch.Tensor, t: torch.Tensor):
        self.s, self.thr, self.t = s, thr, t


class CurricularFaceRows:
    """The margin of one forward: the target as ArcFace (linear extension); ``negatives`` advances
    ``t`` (once: never in a recomputation during backward) and gives the rows' thresholds."""

    def __init__(self, module: CurricularFace):
        self.module, self.s = module, module.s

    def psi_and_grad(self, cos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.target_margin.psi_and_grad(cos_t)

    @torch.no_grad()
    def negatives(self, cos_y: torch.Tensor, valid: torch.Tensor) -> _Negatives:
        """``cos_y`` (B,): every row's target cosine, identical on every rank."""
        mod = self.module
        if mod.training and torch._C._current_graph_task_id() == -1:
            # no host read: a batch without a valid row leaves t as it is
            n = valid.sum()
            mean = torch.where(valid, cos_y.double(), 0.0).sum() / n.clamp_min(1)
            mod.t.copy_(torch.where(n > 0, mod.t * (1 - mod.t_alpha) + mod.t_alpha * mean, mod.t))
        c = cos_y.clamp(-1.0, 1.0)
        thr = c * math.cos(mod.m) - torch.sqrt((1.0 - c * c).clamp_min(0.0)) * math.sin(mod.m)  # cos(theta + m)
        return _Negatives(self.s, thr, mod.t.to(cos_y.dtype))

"""Independent float64 single-process reference, written from the formulas (not from the library).

The whole (B, C) logit matrix is built with plain autograd ops and fed to
``torch.nn.functional.cross_entropy``; gradients come from autograd, so the exact derivative of
the margin (through ``acos``) is what the library must reproduce.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_psi(theta: torch.Tensor, m1: float, m2: float, m3: float, extension: str) -> torch.Tensor:
    phi = m1 * theta + m2
    if extension == "none":
        return torch.cos(phi) - m3
    if extension == "linear":
        return torch.where(theta + m2 <= math.pi, torch.cos(theta + m2),
                           torch.cos(theta) - m2 * math.sin(m2)) - m3
    k = torch.floor(phi / math.pi)
    return torch.pow(-1.0, k) * torch.cos(phi) - 2 * k - m3


def reference_loss(x, weight, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, extension="monotonic",
                   straight_through=False, ignore_index=-100, sub_centers=1):
    """Mean margin-softmax cross-entropy over the valid rows of (x, labels) against all of ``weight``.

    ``sub_centers`` k: ``weight`` has k consecutive rows per class and a class's cosine is the
    largest of its rows' (autograd's max sends the gradient to that row)."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()  # (B, C k)
    if sub_centers > 1:
        cos = cos.view(cos.shape[0], -1, sub_centers).max(dim=2).values  # (B, C)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    cos_t = cos.gather(1, y[:, None]).squeeze(1)
    psi = reference_psi(torch.acos(cos_t.clamp(-1, 1)), m1, m2, m3, extension)
    if straight_through:
        psi = cos_t + (psi - cos_t).detach()
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    logits = s * (cos + onehot * (psi - cos_t)[:, None])
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def reference_grads(x, weight, labels, **margin):
    """(loss, d loss / d x, d loss / d weight), all float64."""
    x = x.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    loss = reference_loss(x, weight, labels, **margin)
    gx, gw = torch.autograd.grad(loss, [x, weight], allow_unused=False)
    return loss.detach(), gx, gw

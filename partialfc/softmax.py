"""Sharded margin-softmax cross-entropy: the only code that touches (B_global x C_local) logits.

Every rank holds the gathered batch ``x_global`` (B, d) and its own weight rows ``weight``
(C_local, d). With ``x^ = x / |x|``, ``n_j = |w_j|`` and ``cos_ij = x^_i . w_j / n_j``:

    z_ij = s * cos_ij                       for j != y_i
    z_iy = s * psi(cos_iy)                  target (trigonometry on the B target entries only)
    loss = (1/N) sum_{valid i} [ log sum_j exp(z_ij) - z_iy ]     over ALL classes of ALL ranks

Forward, per rank: logits by one matrix product per block (the block is all of C_local, or
``chunk_size`` classes), scaled in place by ``s / n_j``; local row max; exp and row sum in place;
then 2 collectives whose size never depends on the number of classes:
``all_reduce(MAX)`` of the row maxima (B,) and ``all_reduce(SUM)`` of (rescaled sum-exp, target
logit, target cosine) (3, B). Backward: no collective here (the embedding gradient's
reduce-scatter belongs to :class:`partialfc.collectives.GatherEmbeddings`):

    G'_ij = (s/N) (p_ij - [j = y_i] ) * (psi'(cos_iy) if j = y_i else 1) / n_j     (B, C_local)
    dL/dx^ = G' W                      dL/dw_j = A_j - (A_j . w_j) w_j / n_j^2,  A = G'^T x^

followed by the projection through ``x^ = x / |x|``. The materialized path keeps one
(B, C_local) buffer of exponentials (accumulation dtype) for backward and turns it into G' in
place; the chunked path keeps no logits at all and recomputes each block in backward.

Mixed precision: the matrix products run in ``mm_dtype`` (e.g. bf16 under autocast); logits,
log-sum-exp and gradients accumulate in float32 (float64 when ``mm_dtype`` is float64).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .collectives import ProcessGroup, all_reduce_, refuse_double_backward
from .margin import CombinedMargin

_NORM_EPS = 1e-12
# rows per slice of the radial projection (bounds its (rows, d) product temporary): small slices are
# fastest on CPU caches, large ones keep the kernel count low on GPUs
VECDOT_ROWS = {"cpu": 4096}
VECDOT_ROWS_DEFAULT = 65536


def _accumulation_dtype(mm_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if mm_dtype == torch.float64 else torch.float32


def safe_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / |x|, |x|)`` per row of ``x`` (B, d), exact for norms that over- or underflow when squared
    (rows of 1e19 or 1e-25 in float32): each row is first divided by its largest magnitude. A zero row
    gives a zero direction and the norm ``_NORM_EPS``."""
    peak = x.abs().amax(dim=1, keepdim=True) if x.shape[1] else x.new_zeros(x.shape[0], 1)  # (B, 1)
    nonzero = peak > 0
    peak = torch.where(nonzero, peak, 1.0)
    scaled = x / peak
    n = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)  # in [1, sqrt(d)] for non-zero rows
    xhat = scaled / torch.where(nonzero, n, 1.0)
    return xhat, torch.where(nonzero, n * peak, _NORM_EPS)


def _block_logits(xhat_mm, w_mm, col_scale, c0, c1, target, logit_t, acc, neg=None):
    """Scaled logits of classes [c0, c1) with the target entries replaced: ``(z, factor)``, z
    (B, c1 - c0) in ``acc``. With ``neg`` (a margin that reshapes hard negatives, CurricularFace) the
    non-target entries with cos > neg.thr become s cos (t + cos), and ``factor`` (B, cb) holds
    d(logit)/d(s cos) of every entry for the backward; else ``factor`` is None."""
    z = torch.mm(xhat_mm, w_mm[c0:c1].t())  # (B, cb)
    if z.dtype != acc:
        z = z.to(acc)
    z.mul_(col_scale[c0:c1])
    factor = None
    if neg is not None and z.shape[0]:
        z, factor = _hard_negatives(z, target, c0, c1, neg)
    if z.shape[0]:
        _put_target(z, target, c0, c1, lambda old: logit_t)
    return z, factor


def _hard_negatives(z, target, c0, c1, neg):
    """``s cos_j -> s cos_j (t + cos_j)`` where ``cos_j > thr_i`` (not on the target): (z, factor)."""
    cos = z / neg.s  # (B, cb)
    hard = cos > neg.thr.unsqueeze(1)
    in_block = (target >= c0) & (target < c1)  # the target entry is replaced by the margin logit
    col = (target - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)
    hard.scatter_(1, col, hard.gather(1, col) & ~in_block.unsqueeze(1))
    factor = torch.where(hard, neg.t + 2 * cos, torch.ones_like(cos))
    return torch.where(hard, z * (neg.t + cos), z), factor


def _put_target(z, target, c0, c1, new_value):
    """``z[i, y_i - c0] = new_value(z[i, y_i - c0])`` for the rows whose target is in [c0, c1)."""
    in_block = (target >= c0) & (target < c1)  # (B,)
    col = (target - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)  # (B, 1)
    old = z.gather(1, col).squeeze(1)
    z.scatter_(1, col, torch.where(in_block, new_value(old), old).unsqueeze(1))


class _BackwardParts(NamedTuple):
    """What every block of the backward reads (shapes: B rows, C_local classes, d features)."""
    xhat_mm: torch.Tensor    # (B, d) normalised embeddings in the product dtype
    w_mm: torch.Tensor       # (C_local, d) weights in the product dtype
    weight: torch.Tensor     # (C_local, d) weights as stored
    inv_norm: torch.Tensor   # (C_local,) 1 / |w_j|
    target: torch.Tensor     # (B,) local target row or -1
    row_gain: torch.Tensor   # (B,) s * dL/dloss / N on valid rows, else 0
    dpsi: torch.Tensor       # (B,) d psi / d cos of each row's target
    grad_xhat: torch.Tensor  # (B, d) accumulated
    grad_w: torch.Tensor     # (C_local, d) written block by block


def _grad_block(g, c0, c1, p: _BackwardParts):
    """Turn the block's probabilities-times-row-factor ``g`` (B, cb) into G' in place and
    accumulate its contribution to ``p.grad_xhat`` (B, d) and ``p.grad_w[c0:c1]`` (cb, d).

    ``grad_w`` has the weight's dtype; the radial projection runs in the accumulation dtype on
    row slices, so no full-size higher-precision copy of the weights or of their gradient exists.
    """
    xhat_mm, w_mm, weight, inv_norm, target, row_gain, dpsi, grad_xhat, grad_w = p
    acc = g.dtype
    g.mul_(inv_norm[c0:c1])
    if g.shape[0]:
        # target column: (g0 p_iy - g0) psi' / n_y, where g currently holds g0 p_iy / n_y
        _put_target(g, target, c0, c1,
                    lambda old: (old - row_gain * inv_norm[target.clamp(c0, c1 - 1)]) * dpsi)
    g_mm = g.to(xhat_mm.dtype)
    grad_xhat.add_(torch.mm(g_mm, w_mm[c0:c1]))  # (B, d)
    a = grad_w[c0:c1]  # (cb, d), contiguous rows: the product is written straight into the gradient
    if g_mm.dtype == a.dtype:
        torch.mm(g_mm.t(), xhat_mm, out=a)
    else:
        a.copy_(torch.mm(g_mm.t(), xhat_mm))
    # dL/dw_j = a_j - (a_j . w_j) w_j / n_j^2, in slices: vecdot materialises a * w, and a
    # low-precision a or w is promoted one slice at a time
    rows = VECDOT_ROWS.get(a.device.type, VECDOT_ROWS_DEFAULT)
    for r0 in range(0, c1 - c0, rows):
        r1 = min(r0 + rows, c1 - c0)
        a_s, w_s = a[r0:r1].to(acc), weight[c0 + r0: c0 + r1].to(acc)  # views when already acc
        coef = torch.linalg.vecdot(a_s, w_s) * inv_norm[c0 + r0: c0 + r1].square()
        a_s.addcmul_(w_s, coef.unsqueeze(1), value=-1.0)
        if a_s.dtype != a.dtype:  # else a_s is a view of a and already updated
            a[r0:r1].copy_(a_s)


class MarginSoftmaxCrossEntropy(torch.autograd.Function):
    """forward: sharded margin softmax cross-entropy, all-reduce MAX then all-reduce SUM.
    backward: exact gradients for ``x_global`` and ``weight``, no collective.

    Inputs: x_global (B, d) unnormalised; weight (C_local, d) unnormalised rows; target (B,)
    int64 row of ``weight`` holding the row's target class, or -1 when another rank holds it;
    valid (B,) bool rows that count (label != ignore_index, identical on every rank).
    Returns the loss (scalar, identical on every rank) and, not differentiable, ``stats``
    (3, B): [global max logit, global target logit, global target cosine].
    """

    @staticmethod
    def forward(ctx, x_global, weight, target, valid, margin: CombinedMargin, group: ProcessGroup,
                chunk_size: Optional[int], mm_dtype: torch.dtype):
        """The module docstring's forward, top to bottom (longer than a screen on purpose: the
        in-place buffer handling is easiest to check when read in one piece)."""
        acc = _accumulation_dtype(mm_dtype)
        device_type = x_global.device.type
        with torch.autocast(device_type, enabled=False):
            num_local = weight.shape[0]
            chunk = num_local if not chunk_size else min(chunk_size, num_local)
            s = float(margin.s)
            xhat, x_norm = safe_normalize(x_global.to(acc))  # (B, d), (B, 1)
            inv_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc).clamp_min(_NORM_EPS).reciprocal()  # (C,)
            owned = target >= 0
            t_row = target.clamp_min(0)
            # target cosines from the B target rows only: (B,)
            w_t = weight.index_select(0, t_row).to(acc)
            cos_t = (torch.linalg.vecdot(xhat, w_t) * inv_norm[t_row]).clamp(-1.0, 1.0)
            psi, dpsi = margin.psi_and_grad(cos_t)
            logit_t = (s * psi).to(acc)
            neg = None
            if hasattr(margin, "negatives"):  # every rank needs each row's threshold: one extra (B,) all-reduce
                cos_all = all_reduce_(torch.where(owned, cos_t, 0.0), "sum", group)
                neg = margin.negatives(cos_all, valid)
            xhat_mm = xhat.to(mm_dtype)
            w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
            col_scale = inv_norm * s

            buffer = None
            m_local = s_local = None
            for c0 in range(0, num_local, chunk):
                c1 = min(c0 + chunk, num_local)
                z, _ = _block_logits(xhat_mm, w_mm, col_scale, c0, c1, target, logit_t, acc, neg)
                m_blk = z.amax(dim=1)  # (B,)
                if m_local is None:
                    m_local = m_blk
                    z.sub_(m_local.unsqueeze(1)).exp_()
                    s_local = z.sum(dim=1)
                else:
                    m_new = torch.maximum(m_local, m_blk)
                    z.sub_(m_new.unsqueeze(1)).exp_()
                    s_local = s_local * torch.exp(m_local - m_new) + z.sum(dim=1)
                    m_local = m_new
                if chunk == num_local and neg is None:
                    buffer = z  # exp(z - m_local), kept for backward (hard negatives recompute instead)
                del z  # chunked: free this block before the next one is formed
            m_global = all_reduce_(m_local.clone(), "max", group)
            stats = torch.stack([s_local * torch.exp(m_local - m_global),
                                 torch.where(owned, logit_t, 0.0),
                                 torch.where(owned, cos_t, 0.0)])  # (3, B)
            all_reduce_(stats, "sum", group)
            sum_exp, t_global, cos_global = stats[0], stats[1], stats[2]
            n_valid = valid.sum().clamp_min(1).to(acc)
            row_loss = torch.where(valid, torch.log(sum_exp) + m_global - t_global, 0.0)
            loss = row_loss.sum() / n_valid

        ctx.margin_s, ctx.chunk, ctx.mm_dtype, ctx.acc, ctx.neg = s, chunk, mm_dtype, acc, neg
        ctx.x_dtype = x_global.dtype
        ctx.save_for_backward(xhat, x_norm, weight, inv_norm, target, valid, dpsi, m_local, m_global,
                              sum_exp, n_valid, logit_t)
        ctx.buffer = buffer  # not saved_for_backward: backward turns it into the gradient in place
        out_stats = torch.stack([m_global, t_global, cos_global])
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_double_backward("the margin softmax loss")
        xhat, x_norm, weight, inv_norm, target, valid, dpsi, m_local, m_global, sum_exp, n_valid, logit_t = \
            ctx.saved_tensors
        s, chunk, mm_dtype, acc = ctx.margin_s, ctx.chunk, ctx.mm_dtype, ctx.acc
        # the first backward consumes the stored exponentials; a repeated one (retain_graph) recomputes
        buffer, ctx.buffer = ctx.buffer, None
        with torch.autocast(xhat.device.type, enabled=False):
            num_local = weight.shape[0]
            g0 = grad_loss.to(acc) * s / n_valid  # scalar: d loss / d logit * s
            row_gain = torch.where(valid, g0, 0.0)  # (B,)
            xhat_mm = xhat.to(mm_dtype)
            w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
            grad_xhat = torch.zeros_like(xhat)
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)  # weight's dtype
            parts = _BackwardParts(xhat_mm, w_mm, weight, inv_norm, target, row_gain, dpsi, grad_xhat, grad_w)
            if buffer is not None:  # materialized: buffer = exp(z - m_local) -> g0 p in place
                buffer.mul_((row_gain * torch.exp(m_local - m_global) / sum_exp).unsqueeze(1))
                _grad_block(buffer, 0, num_local, parts)
            else:  # chunked: recompute each block of logits
                s_inv = row_gain / sum_exp
                col_scale = inv_norm * s
                for c0 in range(0, num_local, chunk):
                    c1 = min(c0 + chunk, num_local)
                    z, factor = _block_logits(xhat_mm, w_mm, col_scale, c0, c1, target, logit_t, acc, ctx.neg)
                    z.sub_(m_global.unsqueeze(1)).exp_().mul_(s_inv.unsqueeze(1))
                    if factor is not None:
                        z.mul_(factor)
                    _grad_block(z, c0, c1, parts)
                    del z
            # through x^ = x / |x|: (g - (g . x^) x^) / |x|
            radial = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(1)
            grad_x = (grad_xhat - radial * xhat) / x_norm
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None, None, None


def margin_softmax_cross_entropy(x_global: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 valid: torch.Tensor, margin: CombinedMargin, group: ProcessGroup = None,
                                 chunk_size: Optional[int] = None,
                                 mm_dtype: Optional[torch.dtype] = None):
    """Functional form of :class:`MarginSoftmaxCrossEntropy`: returns ``(loss, stats)``."""
    if mm_dtype is None:
        mm_dtype = torch.promote_types(x_global.dtype, weight.dtype)
    return MarginSoftmaxCrossEntropy.apply(x_global, weight, target, valid, margin, group, chunk_size, mm_dtype)

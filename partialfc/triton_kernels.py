"""Triton kernels of the fused margin-softmax path (see :mod:`partialfc.triton_softmax`).

Imported only when the triton path first runs (never by ``import partialfc``), so that
``TRITON_INTERPRET=1`` set by then is honoured: ``triton.jit`` decides at decoration time whether
a kernel is compiled for the GPU or interpreted on the CPU.

Every kernel works on tiles of ``BLOCK_B`` rows x ``BLOCK_C`` classes x all ``BLOCK_D >= d``
features; a tile's logits exist only on chip:

    z_ij = s * (x^_i . w_j) / n_j,  z_iy = logit_t_i (the margin logit, precomputed for the B rows),
    z_ij = -inf for padding classes.

- ``forward_kernel``  grid (row blocks, splits): each program runs the online max / sum-exp over
  its split's class blocks and writes the partial (max, sum-exp) of its rows, (splits, B) each.
- ``grad_x_kernel``   grid (row blocks, splits): recomputes the tiles, forms G' and accumulates
  G' W_tile over its split in registers; one store (1 split) or one atomic add per program.
- ``grad_w_kernel``   grid (class blocks,): recomputes the tiles of its classes for every row
  block, accumulates A = G'^T x^ in registers (no atomics, deterministic), applies the radial
  projection A_j - (A_j . w_j) w_j / n_j^2 and writes the weight gradient in the weight's dtype.

G'_ij = p_ij g / n_j off the target and -g (1 - p_iy) dpsi_i / n_y on it, with p_ij g =
exp(z_ij - m_i) * coef_i, ``coef = g / sum-exp``, g = s * dL/dloss / N on valid rows (0 on others),
and ``t_gain = g (1 - p_y)`` precomputed from the non-target sum-exp that ``forward_kernel`` also
returns (``g p_y - g`` would be float32 rounding noise once p_y is near 1).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, IEEE: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_B, BLOCK_C) logits of x (BB, BD) against w (BC, BD), in ACC."""
    if IEEE:
        dot = tl.dot(x, tl.trans(w), input_precision="ieee", out_dtype=ACC)
    else:
        dot = tl.dot(x, tl.trans(w), out_dtype=ACC)
    z = dot * (inv_n * s)[None, :]
    z = tl.where(cols[None, :] == tgt[:, None], logit_t[:, None], z)
    return tl.where(cols[None, :] < C, z, float("-inf"))


@triton.jit
def _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt):
    """G' of a tile (see the module docstring); 0 on padding rows (coef = t_gain = 0) and classes."""
    p = tl.exp(z - m[:, None]) * coef[:, None]
    is_t = cols[None, :] == tgt[:, None]
    g = tl.where(is_t, -t_gain[:, None] * dpsi[:, None], p)
    return g * inv_n[None, :]


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM: tl.constexpr):
    """A row block: (row_ok (BB,), x^ (BB, BD) in MM, target column (BB,), margin logit (BB,))."""
    row_ok = rows < B
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(MM)
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    logit_t = tl.load(LOGIT_T + rows, mask=row_ok, other=0.0)
    return row_ok, x, tgt, logit_t


@triton.jit
def _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt, logit_t, BLOCK_C: tl.constexpr,
                  MM: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Class block ``blk`` against the row block x: (cols (BC,), w (BC, BD) in MM, 1/n (BC,), logits)."""
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(MM)
    inv_n = tl.load(INV_N + cols, mask=col_ok, other=0.0)
    return cols, w, inv_n, _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, IEEE, ACC)


@triton.jit
def _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok):
    """The backward's per-row terms of a row block: (global max, coef, t_gain, dpsi), each (BB,)."""
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    t_gain = tl.load(T_GAIN + rows, mask=row_ok, other=0.0)
    dpsi = tl.load(DPSI + rows, mask=row_ok, other=0.0)
    return m, coef, t_gain, dpsi


@triton.jit
def forward_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, M_OUT, S_OUT, R_OUT, B, C, D, stride_x, stride_w,
                   blocks_per_split, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
    s = tl.load(SCALE)
    m = tl.full((BLOCK_B,), float("-inf"), ACC)
    sum_exp = tl.zeros((BLOCK_B,), ACC)
    rest = tl.zeros((BLOCK_B,), ACC)  # the same without the target column
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))
    for blk in range(first, last):
        cols, w, inv_n, z = _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt, logit_t, BLOCK_C,
                                          MM, IEEE, ACC)
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every block has a real class
        e = tl.exp(z - m_new[:, None])
        e_rest = tl.where(cols[None, :] == tgt[:, None], 0.0, e)
        rescale = tl.exp(m - m_new)
        sum_exp = sum_exp * rescale + tl.sum(e, 1)
        rest = rest * rescale + tl.sum(e_rest, 1)
        m = m_new
    tl.store(M_OUT + split * B + rows, m, mask=row_ok)
    tl.store(S_OUT + split * B + rows, sum_exp, mask=row_ok)
    tl.store(R_OUT + split * B + rows, rest, mask=row_ok)


@triton.jit
def grad_x_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, M, COEF, T_GAIN, DPSI, GX, B, C, D, stride_x, stride_w,
                  stride_gx, blocks_per_split, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                  ATOMIC: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
    m, coef, t_gain, dpsi = _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok)
    s = tl.load(SCALE)
    acc = tl.zeros((BLOCK_B, BLOCK_D), ACC)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))
    for blk in range(first, last):
        cols, w, inv_n, z = _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt, logit_t, BLOCK_C,
                                          MM, IEEE, ACC)
        g = _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt)
        acc = _dot_acc(g.to(MM), w, acc, IEEE)  # (BB, BD)
    out = GX + rows[:, None].to(tl.int64) * stride_gx + offs_d[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def grad_w_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, M, COEF, T_GAIN, DPSI, GW, B, C, D, stride_x, stride_w,
                  stride_gw, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    w_mask = col_ok[:, None] & d_ok[None, :]
    w_raw = tl.load(W + cols[:, None].to(tl.int64) * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
    w = w_raw.to(MM)
    inv_n = tl.load(INV_N + cols, mask=col_ok, other=0.0)
    s = tl.load(SCALE)
    acc = tl.zeros((BLOCK_C, BLOCK_D), ACC)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
        m, coef, t_gain, dpsi = _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok)
        z = _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, IEEE, ACC)
        g = _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt)
        acc = _dot_acc(tl.trans(g.to(MM)), x, acc, IEEE)  # (BC, BD)
    # dL/dw_j = A_j - (A_j . w_j) w_j / n_j^2, with the weight as stored
    w_acc = w_raw.to(ACC)
    radial = tl.sum(acc * w_acc, 1) * inv_n * inv_n
    acc = acc - radial[:, None] * w_acc
    tl.store(GW + cols[:, None].to(tl.int64) * stride_gw + offs_d[None, :], acc.to(GW.dtype.element_ty),
             mask=w_mask)

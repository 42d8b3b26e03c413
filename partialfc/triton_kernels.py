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

Two compile-time switches (``tl.constexpr``; ``K = KP = 1, HARD = False`` is the plain kernel, op for
op, and its extra pointers are ``None``):

- ``K`` sub-centers (``KP`` = K rounded up to a power of two): class j owns weight rows j K ... j K +
  K - 1. A tile of ``BLOCK_C`` classes loads their rows as ``BLOCK_C * KP`` slots (class-major, the
  ``KP - K`` slots past a class's rows are padding), forms the (BLOCK_B, BLOCK_C * KP) row logits
  with one product, and reduces each class's slots to their max (the lowest slot on ties, as
  ``torch.max``): ``arg`` (BLOCK_B, BLOCK_C). The target entry's slot is ``TSUB`` (B,), the nearest
  of the target's rows, computed with the target cosine outside. The backward sends G'_ij to slot
  ``arg_ij`` only (scaled by that row's 1/n) and multiplies the (BLOCK_B, BLOCK_C * KP) result by
  the slots' rows: dL/dx^ and dL/dW get nothing from the rows that lost.
- ``HARD`` (CurricularFace): a non-target class with cos_ij > ``THR``_i (B,) has the logit
  s cos_ij (t + cos_ij), ``t`` a scalar (``T``, constant for the gradient); the backward multiplies
  its p_ij by ``factor`` = t + 2 cos_ij. With sub-centers the test reads the class's max cosine.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, t_sub, thr, t, IEEE: tl.constexpr, ACC: tl.constexpr,
                 K: tl.constexpr, KP: tl.constexpr, HARD: tl.constexpr):
    """Class logits of x (BB, BD) against the rows w (BC KP, BD) of the classes ``cols`` (BC,), in ACC:
    (z (BB, BC), arg, factor). ``arg`` (BB, BC) int32, the slot that won each class (K > 1), and
    ``factor`` (BB, BC), d z / d (s cos) (HARD), are ``z`` itself where not used (never read then)."""
    if IEEE:
        dot = tl.dot(x, tl.trans(w), input_precision="ieee", out_dtype=ACC)
    else:
        dot = tl.dot(x, tl.trans(w), out_dtype=ACC)
    z = dot * (inv_n * s)[None, :]  # (BB, BC KP)
    is_t = cols[None, :] == tgt[:, None]
    arg = z
    if K > 1:
        z, arg = _sub_center_max(z, K, KP)  # (BB, BC) each
        arg = tl.where(is_t, t_sub[:, None], arg)
    factor = z
    if HARD:
        z, factor = _hard_negatives(z, s, thr, t)
    z = tl.where(is_t, logit_t[:, None], z)
    return tl.where(cols[None, :] < C, z, float("-inf")), arg, factor


@triton.jit
def _sub_center_max(z, K: tl.constexpr, KP: tl.constexpr):
    """Slot logits z (BB, BC KP) -> per class (largest (BB, BC), its slot (BB, BC) int32, the lowest
    on ties). Padding slots (>= K) are -inf before the max; padding classes' rows are zero (so 0)."""
    if K < KP:
        z = tl.where((tl.arange(0, z.shape[1]) % KP < K)[None, :], z, float("-inf"))
    z3 = tl.reshape(z, (z.shape[0], z.shape[1] // KP, KP))  # (BB, BC, KP)
    top = tl.max(z3, 2)
    slot = tl.arange(0, KP)
    arg = tl.min(tl.where(z3 == top[:, :, None], slot[None, None, :], KP), 2)
    return top, arg


@triton.jit
def _hard_negatives(z, s, thr, t):
    """CurricularFace: ``s cos -> s cos (t + cos)`` where cos > thr_i: (z, factor). The target entry
    is left to the caller, which replaces it (logit and gradient) whatever this gives there."""
    cos = z / s
    hard = cos > thr[:, None]
    factor = tl.where(hard, t + 2 * cos, 1.0)
    return tl.where(hard, z * (t + cos), z), factor


@triton.jit
def _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt, arg, factor, K: tl.constexpr, KP: tl.constexpr,
               HARD: tl.constexpr):
    """G' of a tile (see the module docstring) at slot level (BB, BC KP); 0 on padding rows
    (coef = t_gain = 0), classes and slots, and on the slots that lost their class's max."""
    p = tl.exp(z - m[:, None]) * coef[:, None]
    if HARD:
        p = p * factor
    is_t = cols[None, :] == tgt[:, None]
    g = tl.where(is_t, -t_gain[:, None] * dpsi[:, None], p)
    if K > 1:
        g = _to_slots(g, arg, KP)
    return g * inv_n[None, :]


@triton.jit
def _to_slots(g, arg, KP: tl.constexpr):
    """Class-level g (BB, BC) -> slot level (BB, BC KP): each entry to the slot ``arg`` that won it."""
    slot = tl.arange(0, KP)
    g3 = tl.where(arg[:, :, None] == slot[None, None, :], g[:, :, None], 0.0)  # (BB, BC, KP)
    return tl.reshape(g3, (g.shape[0], g.shape[1] * KP))


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
def _load_switch_rows(TSUB, THR, rows, row_ok, logit_t, K: tl.constexpr, HARD: tl.constexpr):
    """A row block's terms of the switches: (target slot (BB,) int32 if K > 1, threshold (BB,) if
    HARD); ``logit_t`` stands in for what is off."""
    t_sub = logit_t
    thr = logit_t
    if K > 1:
        t_sub = tl.load(TSUB + rows, mask=row_ok, other=0).to(tl.int32)
    if HARD:
        thr = tl.load(THR + rows, mask=row_ok, other=0.0)
    return t_sub, thr


@triton.jit
def _class_rows(blk, C, BLOCK_C: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """The weight rows of class block ``blk``, KP slots per class (class-major):
    (row index (BC KP,), slot holds a row (BC KP,))."""
    if K == 1:
        rows = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = rows < C
    else:
        slot = tl.arange(0, BLOCK_C * KP)
        cls = blk * BLOCK_C + slot // KP
        sub = slot % KP
        rows = cls * K + sub
        ok = (cls < C) & (sub < K)
    return rows, ok


@triton.jit
def _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt, logit_t, t_sub, thr, t,
                  BLOCK_C: tl.constexpr, MM: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                  K: tl.constexpr, KP: tl.constexpr, HARD: tl.constexpr):
    """Class block ``blk`` against the row block x: (cols (BC,), w (BC KP, BD) in MM, 1/n (BC KP,),
    logits (BB, BC), arg, factor) (see :func:`_tile_logits`)."""
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    wrows, w_ok = _class_rows(blk, C, BLOCK_C, K, KP)
    w = tl.load(W + wrows[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                mask=w_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(MM)
    inv_n = tl.load(INV_N + wrows, mask=w_ok, other=0.0)
    z, arg, factor = _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, t_sub, thr, t, IEEE, ACC, K, KP, HARD)
    return cols, w, inv_n, z, arg, factor


@triton.jit
def _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok):
    """The backward's per-row terms of a row block: (global max, coef, t_gain, dpsi), each (BB,)."""
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    t_gain = tl.load(T_GAIN + rows, mask=row_ok, other=0.0)
    dpsi = tl.load(DPSI + rows, mask=row_ok, other=0.0)
    return m, coef, t_gain, dpsi


@triton.jit
def _load_t(T, s, HARD: tl.constexpr):
    """CurricularFace's t (a scalar) when HARD, else ``s`` as a stand-in (never read)."""
    t = s
    if HARD:
        t = tl.load(T)
    return t


@triton.jit
def forward_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, TSUB, THR, T, M_OUT, S_OUT, R_OUT, B, C, D, stride_x,
                   stride_w, blocks_per_split, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                   K: tl.constexpr, KP: tl.constexpr, HARD: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
    t_sub, thr = _load_switch_rows(TSUB, THR, rows, row_ok, logit_t, K, HARD)
    s = tl.load(SCALE)
    t = _load_t(T, s, HARD)
    m = tl.full((BLOCK_B,), float("-inf"), ACC)
    sum_exp = tl.zeros((BLOCK_B,), ACC)
    rest = tl.zeros((BLOCK_B,), ACC)  # the same without the target column
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))
    for blk in range(first, last):
        cols, w, inv_n, z, _arg, _factor = _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt,
                                                         logit_t, t_sub, thr, t, BLOCK_C, MM, IEEE, ACC, K, KP,
                                                         HARD)
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
def grad_x_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, M, COEF, T_GAIN, DPSI, TSUB, THR, T, GX, B, C, D, stride_x,
                  stride_w, stride_gx, blocks_per_split, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                  ATOMIC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HARD: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
    t_sub, thr = _load_switch_rows(TSUB, THR, rows, row_ok, logit_t, K, HARD)
    m, coef, t_gain, dpsi = _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok)
    s = tl.load(SCALE)
    t = _load_t(T, s, HARD)
    acc = tl.zeros((BLOCK_B, BLOCK_D), ACC)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(C, BLOCK_C))
    for blk in range(first, last):
        cols, w, inv_n, z, arg, factor = _block_logits(x, W, INV_N, blk, C, offs_d, D, stride_w, s, tgt, logit_t,
                                                       t_sub, thr, t, BLOCK_C, MM, IEEE, ACC, K, KP, HARD)
        g = _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt, arg, factor, K, KP, HARD)  # (BB, BC KP)
        acc = _dot_acc(g.to(MM), w, acc, IEEE)  # (BB, BD)
    out = GX + rows[:, None].to(tl.int64) * stride_gx + offs_d[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def grad_w_kernel(X, W, INV_N, SCALE, TGT, LOGIT_T, M, COEF, T_GAIN, DPSI, TSUB, THR, T, GW, B, C, D, stride_x,
                  stride_w, stride_gw, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  MM: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  HARD: tl.constexpr):
    blk = tl.program_id(0)
    cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    wrows, w_ok = _class_rows(blk, C, BLOCK_C, K, KP)  # (BC KP,): all rows of the block's classes
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    w_mask = w_ok[:, None] & d_ok[None, :]
    w_raw = tl.load(W + wrows[:, None].to(tl.int64) * stride_w + offs_d[None, :], mask=w_mask, other=0.0)
    w = w_raw.to(MM)
    inv_n = tl.load(INV_N + wrows, mask=w_ok, other=0.0)
    s = tl.load(SCALE)
    t = _load_t(T, s, HARD)
    acc = tl.zeros((BLOCK_C * KP, BLOCK_D), ACC)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok, x, tgt, logit_t = _load_rows(X, TGT, LOGIT_T, rows, B, offs_d, D, stride_x, MM)
        t_sub, thr = _load_switch_rows(TSUB, THR, rows, row_ok, logit_t, K, HARD)
        m, coef, t_gain, dpsi = _load_grad_terms(M, COEF, T_GAIN, DPSI, rows, row_ok)
        z, arg, factor = _tile_logits(x, w, inv_n, s, cols, C, tgt, logit_t, t_sub, thr, t, IEEE, ACC, K, KP, HARD)
        g = _tile_grad(z, m, coef, t_gain, dpsi, inv_n, cols, tgt, arg, factor, K, KP, HARD)  # (BB, BC KP)
        acc = _dot_acc(tl.trans(g.to(MM)), x, acc, IEEE)  # (BC KP, BD)
    # dL/dw_j = A_j - (A_j . w_j) w_j / n_j^2, with the weight as stored
    w_acc = w_raw.to(ACC)
    radial = tl.sum(acc * w_acc, 1) * inv_n * inv_n
    acc = acc - radial[:, None] * w_acc
    tl.store(GW + wrows[:, None].to(tl.int64) * stride_gw + offs_d[None, :], acc.to(GW.dtype.element_ty),
             mask=w_mask)

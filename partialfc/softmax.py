"""Sharded margin-softmax cross-entropy: the only code that touches (B_global x C_local) logits.

Every rank holds the gathered batch ``x_global`` (B, d) and its own weight rows ``weight``
(C_local, d). With ``x^ = x / |x|``, ``n_j = |w_j|`` and ``cos_ij = x^_i . w_j / n_j``:

    z_ij = s * cos_ij                       for j != y_i
    z_iy = s * psi(cos_iy)                  target (trigonometry on the B target entries only)
    loss = (1/N) sum_{valid i} [ log sum_j exp(z_ij) - z_iy ]     over ALL classes of ALL ranks

Forward, per rank: logits by one matrix product per block (the block is all of C_local, or
``chunk_size`` classes), scaled in place by ``s / n_j``; local row max; exp and row sum in place;
then 2 collectives whose size never depends on the number of classes:
``all_reduce(MAX)`` of the row maxima (B,) and ``all_reduce(SUM)`` of (rescaled sum-exp, rescaled
sum-exp without the target, target logit, target cosine) (4, B). Backward: no collective here (the embedding gradient's
reduce-scatter belongs to :class:`partialfc.collectives.GatherEmbeddings`):

    G'_ij = (s/N) (p_ij - [j = y_i] ) * (psi'(cos_iy) if j = y_i else 1) / n_j     (B, C_local)
    dL/dx^ = G' W                      dL/dw_j = A_j - (A_j . w_j) w_j / n_j^2,  A = G'^T x^

followed by the projection through ``x^ = x / |x|``. The materialized path keeps one
(B, C_local) buffer of exponentials (accumulation dtype) for backward and turns it into G' in
place; the chunked path keeps no logits at all and recomputes each block in backward.

Sub-centers (``sub_centers = k``): ``weight`` holds k consecutive rows per class; each block's
product covers its classes' k rows, ``cos_ij`` is the largest of class j's rows and the backward
sends G'_ij to that row only (the materialized path keeps which row won, one byte per entry).

Mixed precision: the matrix products run in ``mm_dtype`` (e.g. bf16 under autocast); logits,
log-sum-exp and gradients accumulate in float32 (float64 when ``mm_dtype`` is float64).

Gradient filtering (``grad_filter``, :mod:`partialfc.grad_filter`): the classes are cut into blocks;
the forward keeps, as a by-product of its row maximum, the largest non-target logit of each (row,
block) (:class:`_FilterForward`), from which the backward decides, before any product, which blocks
have all non-target entries of p f below eps (:class:`_FilteredBackward`). Those are never read,
scaled or recomputed: both products and, in the chunked path, the recomputation skip them; the target
entries of skipped blocks are applied exactly, and a bound on what was dropped is reported. Off
(``None``) runs the code above unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .collectives import ProcessGroup, all_reduce_, refuse_double_backward
from .grad_filter import GradFilterStats, default_eps
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


def target_cosines(xhat: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor, target: torch.Tensor,
                    k: int) -> tuple:
    """``(cos_t (B,), t_sub)``: each row's target cosine from its target class's rows only (B k of
    them), shared by the torch and triton paths; with k > 1 the largest of the class's k rows' and ``t_sub``
    (B,) int64 the row that gave it (the lowest on ties, ``torch.max``), else None. Rows whose target
    another rank holds (-1) read class 0 (never used)."""
    b = xhat.shape[0]
    if weight.shape[0] == 0:
        return xhat.new_zeros(b), (None if k == 1 else target.new_zeros(b))
    t_row = target.clamp_min(0)
    if k == 1:
        w_t = weight.index_select(0, t_row).to(xhat.dtype)  # (B, d): the target rows only
        return (torch.linalg.vecdot(xhat, w_t) * inv_norm[t_row]).clamp(-1.0, 1.0), None
    rows = (t_row.unsqueeze(1) * k + torch.arange(k, device=t_row.device)).view(-1)  # (B k,)
    w_t = weight.index_select(0, rows).to(xhat.dtype).view(b, k, weight.shape[1])  # (B, k, d)
    cos_sub = torch.linalg.vecdot(xhat.unsqueeze(1), w_t) * inv_norm[rows].view(b, k)  # (B, k)
    cos_t, t_sub = cos_sub.max(dim=1)
    return cos_t.clamp(-1.0, 1.0), t_sub



class _SubCenters(NamedTuple):
    """Sub-center rows: class c owns rows c*k ... c*k + k - 1; ``t_sub`` (B,) is the row of each
    target class that is nearest to the row's embedding (the one the target logit and its gradient use)."""
    k: int
    t_sub: torch.Tensor


def _block_logits(xhat_mm, w_mm, col_scale, c0, c1, target, logit_t, acc, neg=None, sub=None):
    """Scaled logits of classes [c0, c1) with the target entries replaced: ``(z, factor, arg)``, z
    (B, c1 - c0) in ``acc``. With ``neg`` (a margin that reshapes hard negatives, CurricularFace) the
    non-target entries with cos > neg.thr become s cos (t + cos), and ``factor`` (B, cb) holds
    d(logit)/d(s cos) of every entry for the backward; else ``factor`` is None. With ``sub``
    (sub-centers) a class's logit is the largest of its k rows' and ``arg`` (B, cb) says which row
    (the target's is ``sub.t_sub``); else ``arg`` is None."""
    k = 1 if sub is None else sub.k
    z = torch.mm(xhat_mm, w_mm[c0 * k:c1 * k].t())  # (B, cb * k)
    if z.dtype != acc:
        z = z.to(acc)
    z.mul_(col_scale[c0 * k:c1 * k])
    arg = None
    if k > 1:
        z, arg = z.view(z.shape[0], c1 - c0, k).max(dim=2)  # (B, cb): max over each class's rows (s > 0)
        if z.shape[0]:
            _put_target(arg, target, c0, c1, lambda old: sub.t_sub)
    factor = None
    if neg is not None and z.shape[0]:
        z, factor = _hard_negatives(z, target, c0, c1, neg)
    if z.shape[0]:
        _put_target(z, target, c0, c1, lambda old: logit_t)
    return z, factor, arg


def _to_rows(g, arg, k):
    """Class-level gradient ``g`` (B, cb) -> row level (B, cb * k): each entry goes to the row that
    won its class's max (``arg``), the other rows of the class get 0."""
    rows = g.new_zeros(g.shape[0], g.shape[1], k)
    rows.scatter_(2, arg.long().unsqueeze(2), g.unsqueeze(2))
    return rows.view(g.shape[0], g.shape[1] * k)


def _target_column(target, c0, c1):
    """Where the rows' targets sit in a block of classes [c0, c1): ``in_block`` (B,) bool and ``col``
    (B, 1), the target's column (clamped into the block for the rows whose target is elsewhere)."""
    return (target >= c0) & (target < c1), (target - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)


def _hard_negatives(z, target, c0, c1, neg):
    """``s cos_j -> s cos_j (t + cos_j)`` where ``cos_j > thr_i`` (not on the target): (z, factor)."""
    cos = z / neg.s  # (B, cb)
    hard = cos > neg.thr.unsqueeze(1)
    in_block, col = _target_column(target, c0, c1)  # the target entry is replaced by the margin logit
    hard.scatter_(1, col, hard.gather(1, col) & ~in_block.unsqueeze(1))
    factor = torch.where(hard, neg.t + 2 * cos, torch.ones_like(cos))
    return torch.where(hard, z * (neg.t + cos), z), factor


def _put_target(z, target, c0, c1, new_value):
    """``z[i, y_i - c0] = new_value(z[i, y_i - c0])`` for the rows whose target is in [c0, c1)."""
    in_block, col = _target_column(target, c0, c1)  # (B,), (B, 1)
    old = z.gather(1, col).squeeze(1)
    z.scatter_(1, col, torch.where(in_block, new_value(old), old).unsqueeze(1))


def _sums_without_target(e, target, c0, c1, blocks=None):
    """Row sums of the exponentials ``e`` (B, cb) of classes [c0, c1): ``(all, all but the target)``.

    The second is summed with the target entry left out, not obtained by subtracting it: for a
    well-classified row the non-target mass ``1 - p_y`` (1e-8 and less with s = 64) is far below
    the float32 resolution of the total, so a difference would be rounding noise, and that mass is
    the target's gradient (see the backward). With ``blocks`` (an int): also the non-target sums of
    each row's blocks of that many columns, (B, ceil(cb / blocks)) (gradient filtering's bound)."""
    in_block, col = _target_column(target, c0, c1)  # (B,), (B, 1)
    saved = e.gather(1, col)  # (B, 1)
    e.scatter_(1, col, torch.where(in_block.unsqueeze(1), 0.0, saved))
    rest = e.sum(dim=1)
    block_sums = None if blocks is None else _row_blocks(e, blocks, "sum")
    e.scatter_(1, col, saved)
    if blocks is not None:
        return rest + torch.where(in_block, saved.squeeze(1), 0.0), rest, block_sums
    return rest + torch.where(in_block, saved.squeeze(1), 0.0), rest


class _BackwardParts(NamedTuple):
    """What every block of the backward reads (shapes: B rows, C_local classes, d features)."""
    xhat_mm: torch.Tensor    # (B, d) normalised embeddings in the product dtype
    w_mm: torch.Tensor       # (C_local, d) weights in the product dtype
    weight: torch.Tensor     # (C_local, d) weights as stored
    inv_norm: torch.Tensor   # (C_local,) 1 / |w_j|
    target: torch.Tensor     # (B,) local target row (with sub-centers: the nearest row of the class) or -1
    t_gain: torch.Tensor     # (B,) s dL/dloss / N * (1 - p_y) on valid rows (else 0), 1 - p_y from the
                             # non-target sum-exp (exact when tiny)
    dpsi: torch.Tensor       # (B,) d psi / d cos of each row's target
    grad_xhat: torch.Tensor  # (B, d) accumulated
    grad_w: torch.Tensor     # (C_local, d) written block by block


def _grad_block(g, c0, c1, p: _BackwardParts):
    """Turn the block's probabilities-times-row-factor ``g`` (B, cb) into G' in place and
    accumulate its contribution to ``p.grad_xhat`` (B, d) and ``p.grad_w[c0:c1]`` (cb, d).

    ``grad_w`` has the weight's dtype; the radial projection runs in the accumulation dtype on
    row slices, so no full-size higher-precision copy of the weights or of their gradient exists.
    """
    xhat_mm, w_mm, weight, inv_norm, target, t_gain, dpsi, grad_xhat, grad_w = p
    acc = g.dtype
    g.mul_(inv_norm[c0:c1])
    if g.shape[0]:
        # target column: (g0 p_iy - g0) psi' / n_y = -g0 (1 - p_iy) psi' / n_y, with 1 - p_iy from the
        # non-target sum-exp: g0 p_iy - g0 in float32 is 0 or rounding noise once p_iy is near 1
        _put_target(g, target, c0, c1, lambda old: -t_gain * inv_norm[target.clamp(c0, c1 - 1)] * dpsi)
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


def _row_blocks(t, fb, how):
    """``how`` ("amax" or "sum") of each row's blocks of ``fb`` consecutive columns of ``t`` (B, n):
    (B, ceil(n / fb)), the last block the remainder. Sums of float32 blocks too long for the bound's
    rounding allowance (:func:`_sum_widen`) run in float64."""
    b, n = t.shape
    full = n - n % fb
    wide = {} if how == "amax" or 4 * fb * torch.finfo(t.dtype).eps < 1 else dict(dtype=torch.float64)
    parts = []
    if full:
        parts.append(getattr(t[:, :full].unflatten(1, (full // fb, fb)), how)(dim=2, **wide))
    if full < n:
        parts.append(getattr(t[:, full:], how)(dim=1, keepdim=True, **wide))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sum_widen(n, dtype) -> float:
    """A factor >= true / computed for a sum of ``n`` non-negative terms in ``dtype``, in any order
    (recursive summation's |error| <= gamma_{n-1} sum, gamma_m = m u / (1 - m u), u = eps / 2)."""
    nu = n * torch.finfo(dtype).eps / 2
    return 1.0 / (1.0 - 2.0 * nu) if nu < 0.25 else float("inf")


def _gram_bound(x, squarings: int = 2):
    """An upper bound of ``||x||_2^2`` (largest singular value squared) of ``x`` (B, d), rigorous in
    floating point: ``lambda_max(G) <= ||G^(2^t)||_F^(1/2^t)`` for the float64 Gram matrix G of the
    smaller side, squared ``t = squarings`` times, with the rounding of every product carried along;
    at most ``||x||_F^2`` (widened). For a flat spectrum the bound is ``k^(1/2^t)`` times the truth
    (k = min(B, d)); for random rows (B = d) about 1.35x with t = 2."""
    x = x.to(torch.float64)
    b, d = x.shape
    if b == 0 or d == 0:
        return 0.0
    u = torch.finfo(torch.float64).eps / 2
    inner, k = max(b, d), min(b, d)

    def gamma(m):
        return m * u / (1 - m * u)

    def fro(t):  # >= the Frobenius norm of the (exact) matrix t
        return float(torch.linalg.vector_norm(t)) * (1 + gamma(t.numel() + 2))

    fro2 = fro(x) ** 2 * (1 + gamma(4))  # >= ||x||_F^2
    if fro2 == 0 or not math.isfinite(fro2):
        return fro2
    g = x.t() @ x if d <= b else x @ x.t()  # (k, k): |g - G| <= gamma(inner) |x|^T |x|, ||.||_2 <= gamma fro2
    g = (g + g.t()) * 0.5  # A, symmetric: lambda_max(G) <= lambda_max(A) + gamma(inner + 2) fro2
    scale = 2.0 ** -math.ceil(math.log2(fro(g)))  # exact: A / 2^e, entries <= 1
    tiny = k ** 3 * 2.0 ** -1074  # what underflow can lose in a scaling or a product (Frobenius)
    h, delta = g * scale, tiny  # h ~ (A scale)^(2^t), ||h - (A scale)^(2^t)||_F <= delta
    for _ in range(squarings):
        nh = fro(h)
        h = h @ h
        delta = delta * (2 * nh + delta) + gamma(k + 2) * nh ** 2 + tiny
    lam = ((fro(h) + delta) ** (1.0 / 2 ** squarings)) * (1 + gamma(8)) / scale + gamma(inner + 2) * fro2
    return min(lam, fro2) * (1 + 1e-12)


def _runs(keep):
    """[(kept, a, b)] maximal runs of equal values of the host list ``keep`` (block indices)."""
    out, a = [], 0
    for i in range(1, len(keep) + 1):
        if i == len(keep) or keep[i] != keep[a]:
            out.append((keep[a], a, i))
            a = i
    return out


# Relative allowance of the forward's block maxima against the rounding of the exponentials and
# products that the exact backward would form from them (a few ulps; far more is allowed): a block is
# skipped only when its estimate times (1 + _SLACK) is below the threshold
_SLACK = 2.0 ** -10


class _FilterForward:
    """What the forward of a filtered head gathers, chunk by chunk, for the backward's skip decision
    and bound (:class:`_FilteredBackward`), from the logits it forms anyway. Blocks of ``fb`` classes
    are counted from each chunk's first class.

    ``block_max(z, factor, target, c0, c1)`` replaces the row maximum of a chunk's logits (the same
    value, bit for bit: a maximum does not round) and keeps its by-product, the largest non-target
    logit of each (row, block); with CurricularFace's ``factor`` the largest ``z + log|factor|``
    instead (two more passes), so that exp of it is the block's largest ``exp(z) |f|``.
    ``sums=True`` (a bound was asked for) also keeps the non-target sum of exp(z - m) of each
    (row, block), relative to that chunk's running max ``m``, folded to the final local max by
    :meth:`finish`, and with a ``factor`` the block's largest ``|factor|``."""

    def __init__(self, fb: int, sums: bool):
        self.fb, self.sums = fb, sums
        self.bmax, self.fmax, self.bsum, self.m_ref = [], [], [], []

    def block_max(self, z, factor, target, c0, c1):
        in_blk, col = _target_column(target, c0, c1)  # (B,), (B, 1)
        saved = z.gather(1, col)  # (B, 1): restored below, bit for bit
        z.scatter_(1, col, torch.where(in_blk.unsqueeze(1), float("-inf"), saved))
        bm = _row_blocks(z, self.fb, "amax")  # (B, nb): non-target maxima (a NaN stays a NaN)
        if factor is None:
            self.bmax.append(bm)
        else:  # the block's largest exp(z) |f| is exp of its largest z + log|f| (the target still -inf)
            f = factor.abs()
            if self.sums:
                self.fmax.append(_row_blocks(f, self.fb, "amax"))
            self.bmax.append(_row_blocks(f.log_().add_(z), self.fb, "amax"))
            del f
        z.scatter_(1, col, saved)
        return torch.maximum(bm.amax(dim=1), torch.where(in_blk, saved.squeeze(1), float("-inf")))

    def row_sums(self, e, target, c0, c1, m_ref):
        """:func:`_sums_without_target` of the chunk's exponentials ``e = exp(z - m_ref)``."""
        if not self.sums:
            return _sums_without_target(e, target, c0, c1)
        s_all, rest, bs = _sums_without_target(e, target, c0, c1, blocks=self.fb)
        self.bsum.append(bs)
        self.m_ref.append(m_ref)
        return s_all, rest

    def finish(self, m_local):
        """``(bmax, fmax, bsum)`` (B, n_blocks) each (None when not gathered); ``bsum`` relative to
        ``m_local`` and in float64."""
        cat = (lambda ts: torch.cat(ts, dim=1) if ts else None)
        bsum = None
        if self.sums:
            bsum = cat([bs.to(torch.float64) * torch.exp(m - m_local).to(torch.float64).unsqueeze(1)
                        for bs, m in zip(self.bsum, self.m_ref)])
        return cat(self.bmax), cat(self.fmax), bsum


class _FilteredBackward:
    """The backward's skip decision and bookkeeping for gradient filtering (``grad_filter``).

    Decided once per backward, before any product, from the forward's block maxima
    (:class:`_FilterForward`): with ``c_i = row_gain_i exp(m_local_i - m_global_i) / S_i`` the
    backward's entries are ``q_ij = c_i exp(z_ij - m_local_i) f_ij``, so ``est_ib = |c_i|
    exp(bmax_ib - m_local_i)`` (``bmax``: the block's largest non-target z, or z + log|f|) is the
    block's largest non-target ``|q_ij|``, up to rounding; the block is
    skipped when ``max_i est_ib (1 + _SLACK) < eps |g0|`` for every row (a NaN keeps it). The slack
    covers the rounding of the exponentials and products the exact rule would compare, so a skipped
    block is one the exact rule skips too (an estimate above the truth only keeps more blocks).
    The backward then never reads, scales or recomputes a skipped block; ``eps = 0`` keeps every
    block without a test (the unfiltered products, bit for bit).

    :meth:`runs` gives a chunk's runs of kept / skipped blocks as class ranges; a kept run goes
    through :meth:`grad` (one :func:`_grad_block`: the whole chunk when nothing is skipped), a skipped
    one through :meth:`skip`; :meth:`materialized` does both for the kept buffer. :meth:`finish`
    applies the target entries of skipped blocks exactly and fills in the statistics.

    The bound (``with_bounds``): each row's skipped mass from the forward's block sums; the weights'
    Frobenius bound from the skipped columns' sums when the buffer is there (one matrix-vector
    product over the skipped blocks), else from the forward's figures and a bound of ``||x^||_2``
    (:mod:`partialfc.grad_filter`)."""

    def __init__(self, stats: GradFilterStats, parts: "_BackwardParts", target, sub, g0, acc, x_norm,
                 fwd, c_row, m_local, chunk, num_local):
        self.stats, self.parts, self.target, self.acc, self.x_norm = stats, parts, target, acc, x_norm
        self.k = 1 if sub is None else sub.k
        stats.eps = default_eps(acc) if stats.eps is None else float(stats.eps)
        fb = self.fb = stats.block
        self.chunk, self.nbc = chunk, -(-chunk // fb)  # classes and blocks per chunk
        self.g0_abs = g0.abs()
        self.c_abs = c_row.abs()  # (B,)
        b = target.shape[0]
        device = target.device
        rows = parts.weight.shape[0]
        n_blocks = (num_local // chunk) * self.nbc + -(-(num_local % chunk) // fb)
        self.kept_rows = torch.ones(rows, dtype=torch.bool, device=device)
        self.t_mask = torch.zeros(b, dtype=torch.bool, device=device)
        self.blocks, self.skipped = n_blocks, 0
        self.with_bounds = stats.with_bounds
        bmax, fmax, bsum = fwd
        if stats.eps == 0 or b == 0:  # everything kept, no test, no host read
            self.keep = [True] * n_blocks
            keep_dev = None
        else:
            est = torch.exp(bmax - m_local.unsqueeze(1)).clamp_min(torch.finfo(acc).tiny) * self.c_abs.unsqueeze(1)
            keep_dev = ~(est.amax(dim=0) * (1 + _SLACK) < stats.eps * self.g0_abs)  # (n_blocks,)
            self.keep = keep_dev.tolist()  # the one host read: which products run
            self.skipped = n_blocks - sum(self.keep)
        if self.skipped:
            y = target.clamp_min(0)
            self.t_mask = (target >= 0) & ~keep_dev[(y // chunk) * self.nbc + (y % chunk) // fb]
        if self.with_bounds:
            self.w_sq = torch.zeros((), dtype=torch.float64, device=device)
            self.row_sum = torch.zeros(b, dtype=torch.float64, device=device)
            if self.skipped:
                inv = parts.inv_norm
                self.max_inv = inv if self.k == 1 else inv.view(-1, self.k).amax(dim=1)  # (classes,)
                skipped = ~keep_dev
                # >= sum over the block's skipped non-target |q_ij|: (B, n_blocks), 0 on kept blocks
                r = bsum * (self.c_abs.to(torch.float64) * _sum_widen(fb, acc)).unsqueeze(1)
                if fmax is not None:
                    r = r * fmax.to(torch.float64)
                self.r = torch.where(skipped, r, 0.0)
                self.row_sum = self.r.sum(dim=1)
                self.est = est.to(torch.float64) * (1 + _SLACK)  # >= the largest |q_ij| of each block

    def runs(self, c0, c1):
        """[(kept, lo, hi)]: the chunk [c0, c1)'s runs of kept / skipped blocks, as class ranges."""
        fb, first = self.fb, (c0 // self.chunk) * self.nbc
        keep = self.keep[first: first + -(-(c1 - c0) // fb)]
        return [(kept, c0 + a * fb, min(c0 + b * fb, c1)) for kept, a, b in _runs(keep)]

    def grad(self, g, lo, hi, arg):
        """A kept run: ``g`` (B, hi - lo) holds its ``q`` at class level (``arg``: the winning sub-centers)."""
        k = self.k
        _grad_block(g if k == 1 else _to_rows(g, arg, k), lo * k, hi * k, self.parts)

    def skip(self, lo, hi):
        """A skipped run: no gradient for its rows (its targets are applied by :meth:`finish`): zeros, or
        nothing at all when only the kept rows are read (``rows_kept_only``: the sparse gradient)."""
        k = self.k
        if not self.stats.rows_kept_only:
            self.parts.grad_w[lo * k: hi * k].zero_()
        self.kept_rows[lo * k: hi * k] = False

    def materialized(self, buffer, arg, c_row):
        """The whole backward of the kept buffer ``exp(z - m_local)`` (B, C_local): the skipped blocks'
        column sums for the bound (the buffer is not written before), then each kept run scaled by
        ``c_row`` (B,) in place and turned into its gradient; the skipped runs are never read
        otherwise. Nothing skipped: ``buffer.mul_(c_row)`` and one :func:`_grad_block`, as unfiltered."""
        runs = self.runs(0, buffer.shape[1])
        if self.with_bounds and self.skipped and buffer.shape[0]:
            self._column_bound(buffer, runs)
        c = c_row.unsqueeze(1)
        for kept, lo, hi in runs:
            if kept:
                g = buffer if (lo, hi) == (0, buffer.shape[1]) else buffer[:, lo:hi]
                g.mul_(c)
                self.grad(g, lo, hi, None if arg is None else arg[:, lo:hi])
            else:
                self.skip(lo, hi)

    def _column_bound(self, e, runs):
        """``w_sq`` from the skipped columns of ``e`` (B, C_local) (exact column sums of |q|, the
        targets left out): sum_j (max 1/n of the class's rows * sum_i |c_i| e_ij)^2."""
        in_blk, col = _target_column(self.target, 0, e.shape[1])
        saved = e.gather(1, col)
        e.scatter_(1, col, torch.where(in_blk.unsqueeze(1), 0.0, saved))
        c = self.c_abs.to(e.dtype)
        # a float32 matrix-vector product may round its inputs to TF32 or bf16 (CUDA, or a matmul precision
        # below "highest"): products then off by up to ~2^-8, covered with room
        reduced = e.dtype == torch.float32 and (e.is_cuda or torch.get_float32_matmul_precision() != "highest")
        widen = _sum_widen(e.shape[0], e.dtype) * (1 + 2.0 ** -6 if reduced else 1.0)
        for kept, lo, hi in runs:
            if not kept:
                col_sum = torch.mv(e[:, lo:hi].t(), c).to(torch.float64) * widen * self.max_inv[lo:hi]
                self.w_sq += col_sum.square().sum()
        e.scatter_(1, col, saved)
        self.column_bound = True

    def finish(self):
        """Target entries of skipped blocks, exactly; then the statistics."""
        p, acc, stats = self.parts, self.acc, self.stats
        if self.skipped:
            i = self.t_mask.nonzero().squeeze(1)  # rows whose target block was skipped
            r = p.target.index_select(0, i)  # their target rows (sub-centers: the nearest row)
            inv = p.inv_norm.index_select(0, r)
            # as _grad_block's target column: -g0 (1 - p_iy) psi' / n_y
            g = -p.t_gain.index_select(0, i) * inv * p.dpsi.index_select(0, i)
            w_r = p.weight.index_select(0, r).to(acc)  # (m, d)
            p.grad_xhat.index_add_(0, i, g.unsqueeze(1) * w_r)
            rows, where = torch.unique(r, return_inverse=True)
            a = torch.zeros(rows.shape[0], w_r.shape[1], dtype=acc, device=w_r.device)
            a.index_add_(0, where, g.unsqueeze(1) * p.xhat_mm.index_select(0, i).to(acc))
            w_s = p.weight.index_select(0, rows).to(acc)
            coef = torch.linalg.vecdot(a, w_s) * p.inv_norm.index_select(0, rows).square()
            a.addcmul_(w_s, coef.unsqueeze(1), value=-1.0)
            p.grad_w.index_copy_(0, rows, a.to(p.grad_w.dtype))
            self.kept_rows[rows] = True
        stats.blocks, stats.skipped_blocks, stats.kept_rows = self.blocks, self.skipped, self.kept_rows
        if self.with_bounds:
            widen = 1.0 + 8 * torch.finfo(acc).eps
            if self.skipped and not getattr(self, "column_bound", False):
                # ||sum_i q_ij x^_i||: ||Q_b^T X^||_F <= min(||X^||_2 ||Q_b||_F, sum_i ||q_ib||),
                # ||q_ib||^2 <= est_ib r_ib (largest entry times sum)
                blk = self._class_blocks()
                inv_sq = torch.zeros(self.blocks, dtype=torch.float64, device=blk.device).scatter_reduce_(
                    0, blk, self.max_inv.to(torch.float64), "amax").square()
                rows_sq = self.est * self.r  # (B, n_blocks), 0 on kept blocks
                xhat = p.xhat_mm

                def weight_bound():  # evaluated when read: the Gram products only for who asks
                    spectral = rows_sq.sum(dim=0) * _gram_bound(xhat)
                    triangle = rows_sq.sqrt().sum(dim=0).square()
                    return (inv_sq * torch.minimum(spectral, triangle)).sum().sqrt() * widen

                stats.defer_weight_bound(weight_bound)
            else:
                stats.weight_bound = self.w_sq.sqrt() * widen
            stats.row_bound = self.row_sum / self.x_norm.squeeze(1).to(torch.float64) * widen
            g0 = self.g0_abs.to(torch.float64)
            stats.row_mass = torch.where(g0 > 0, self.row_sum / torch.where(g0 > 0, g0, 1.0), 0.0)
        else:
            stats.weight_bound = stats.row_bound = stats.row_mass = None
        stats.ready = True

    def _class_blocks(self):
        """(C_local,) the block of each class."""
        cls = torch.arange(self.max_inv.shape[0], device=self.max_inv.device)
        return (cls // self.chunk) * self.nbc + (cls % self.chunk) // self.fb


class Combined(NamedTuple):
    """What :func:`combine_shards` returns; every field (B,) and identical on every rank, but the
    scalars ``loss`` and ``n_valid``."""
    loss: torch.Tensor      # mean cross-entropy over the valid rows
    m_global: torch.Tensor  # max logit
    sum_exp: torch.Tensor   # sum_j exp(z_j - m_global)
    rest: torch.Tensor      # the same without the target: 1 - p_y = rest / sum_exp, exact when tiny
    t_global: torch.Tensor  # target (margin) logit
    cos_global: torch.Tensor  # target cosine
    n_valid: torch.Tensor   # number of valid rows, at least 1


def combine_shards(m_local, s_local, r_local, owned, logit_t, cos_t, valid, acc, group) -> Combined:
    """The loss from every rank's per-row (max, sum-exp, non-target sum-exp) over its classes:
    all-reduce MAX of the maxima (B,), then all-reduce SUM of (rescaled sum-exp, rescaled non-target
    sum-exp, target logit, target cosine) (4, B), each target held by one rank.

    A row's loss is ``log(sum_exp) + m - t``; when the target dominates (p_y >= 1/2) it is computed
    as ``log1p(rest / e_t)``, ``e_t = exp(t - m)``, which keeps its relative precision down to the
    1e-20 losses of well-separated rows instead of the float32 noise of a difference of ~s."""
    m_global = all_reduce_(m_local.clone(), "max", group)
    rescale = torch.exp(m_local - m_global)
    stats = torch.stack([s_local * rescale, r_local * rescale,
                         torch.where(owned, logit_t, 0.0),
                         torch.where(owned, cos_t, 0.0)])  # (4, B)
    all_reduce_(stats, "sum", group)
    sum_exp, rest, t_global, cos_global = stats.unbind(0)
    n_valid = valid.sum().clamp_min(1).to(acc)
    e_t = torch.exp(t_global - m_global)  # (B,) p_y * sum_exp
    peaked = e_t >= rest
    row_loss = torch.where(peaked, torch.log1p(rest / torch.where(peaked, e_t, 1.0)),
                           torch.log(sum_exp) + m_global - t_global)
    row_loss = torch.where(valid, row_loss, 0.0)
    return Combined(row_loss.sum() / n_valid, m_global, sum_exp, rest, t_global, cos_global, n_valid)


class MarginSoftmaxCrossEntropy(torch.autograd.Function):
    """forward: sharded margin softmax cross-entropy, all-reduce MAX then all-reduce SUM.
    backward: exact gradients for ``x_global`` and ``weight``, no collective.

    Inputs: x_global (B, d) unnormalised; weight (C_local * k, d) unnormalised rows, ``k =
    sub_centers`` consecutive rows per class; target (B,) int64 local class of the row's target, or
    -1 when another rank holds it; valid (B,) bool rows that count (label != ignore_index,
    identical on every rank). With k > 1 a class's cosine is the largest of its rows' (the margin
    applies to that one) and each logit's gradient goes to that row only.
    Returns the loss (scalar, identical on every rank) and, not differentiable, ``stats``
    (3, B): [global max logit, global target logit, global target cosine].
    """

    @staticmethod
    def forward(ctx, x_global, weight, target, valid, margin: CombinedMargin, group: ProcessGroup,
                chunk_size: Optional[int], mm_dtype: torch.dtype, sub_centers: int = 1,
                grad_filter: Optional[GradFilterStats] = None):
        """The module docstring's forward, top to bottom (longer than a screen on purpose: the
        in-place buffer handling is easiest to check when read in one piece)."""
        acc = _accumulation_dtype(mm_dtype)
        device_type = x_global.device.type
        with torch.autocast(device_type, enabled=False):
            k = sub_centers
            num_local = weight.shape[0] // k  # classes
            chunk = num_local if not chunk_size else min(chunk_size, num_local)  # classes per block
            s = float(margin.s)
            xhat, x_norm = safe_normalize(x_global.to(acc))  # (B, d), (B, 1)
            inv_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc).clamp_min(_NORM_EPS).reciprocal()  # (C k,)
            owned = target >= 0
            # target cosines from the B target rows only (B k with sub-centers): (B,)
            cos_t, t_sub = target_cosines(xhat, weight, inv_norm, target, k)
            sub = None if k == 1 else _SubCenters(k, t_sub)
            psi, dpsi = margin.psi_and_grad(cos_t)
            logit_t = (s * psi).to(acc)
            neg = None
            if hasattr(margin, "negatives"):  # every rank needs each row's threshold: one extra (B,) all-reduce
                cos_all = all_reduce_(torch.where(owned, cos_t, 0.0), "sum", group)
                neg = margin.negatives(cos_all, valid)
            xhat_mm = xhat.to(mm_dtype)
            w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
            col_scale = inv_norm * s

            buffer = buffer_arg = None
            m_local = s_local = r_local = None
            # gradient filtering: the block maxima (and, for a bound, block sums) of what is formed anyway
            filt = None if grad_filter is None else _FilterForward(grad_filter.block, grad_filter.with_bounds)
            for c0 in range(0, num_local, chunk):
                c1 = min(c0 + chunk, num_local)
                z, factor, arg = _block_logits(xhat_mm, w_mm, col_scale, c0, c1, target, logit_t, acc, neg, sub)
                m_blk = z.amax(dim=1) if filt is None else filt.block_max(z, factor, target, c0, c1)  # (B,)
                del factor
                m_new = m_blk if m_local is None else torch.maximum(m_local, m_blk)
                z.sub_(m_new.unsqueeze(1)).exp_()
                s_blk, r_blk = (_sums_without_target(z, target, c0, c1) if filt is None
                                else filt.row_sums(z, target, c0, c1, m_new))
                if m_local is None:
                    s_local, r_local = s_blk, r_blk
                else:
                    rescale = torch.exp(m_local - m_new)
                    s_local, r_local = s_local * rescale + s_blk, r_local * rescale + r_blk
                m_local = m_new
                if chunk == num_local and neg is None:
                    buffer = z  # exp(z - m_local), kept for backward (hard negatives recompute instead)
                    if arg is not None:  # and which sub-center won each entry, one byte each for k <= 256
                        buffer_arg = arg.to(torch.uint8) if k <= 256 else arg
                del z, arg  # chunked: free this block before the next one is formed
            loss, m_global, sum_exp, rest, t_global, cos_global, n_valid = combine_shards(
                m_local, s_local, r_local, owned, logit_t, cos_t, valid, acc, group)

        ctx.margin_s, ctx.chunk, ctx.mm_dtype, ctx.acc, ctx.neg, ctx.sub = s, chunk, mm_dtype, acc, neg, sub
        ctx.x_dtype, ctx.grad_filter = x_global.dtype, grad_filter
        ctx.save_for_backward(xhat, x_norm, weight, inv_norm, target, valid, dpsi, m_local, m_global,
                              sum_exp, rest, n_valid, logit_t)
        ctx.buffer, ctx.buffer_arg = buffer, buffer_arg  # not saved: backward turns it into the gradient in place
        ctx.filter_fwd = None if filt is None else filt.finish(m_local)
        out_stats = torch.stack([m_global, t_global, cos_global])
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_double_backward("the margin softmax loss")
        xhat, x_norm, weight, inv_norm, target, valid, dpsi, m_local, m_global, sum_exp, rest, n_valid, logit_t = \
            ctx.saved_tensors
        s, chunk, mm_dtype, acc = ctx.margin_s, ctx.chunk, ctx.mm_dtype, ctx.acc
        # the first backward consumes the stored exponentials; a repeated one (retain_graph) recomputes
        buffer, ctx.buffer = ctx.buffer, None
        buffer_arg, sub = ctx.buffer_arg, ctx.sub
        k = 1 if sub is None else sub.k
        with torch.autocast(xhat.device.type, enabled=False):
            num_local = weight.shape[0] // k
            g0 = grad_loss.to(acc) * s / n_valid  # scalar: d loss / d logit * s
            row_gain = torch.where(valid, g0, 0.0)  # (B,)
            xhat_mm = xhat.to(mm_dtype)
            w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
            grad_xhat = torch.zeros_like(xhat)
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)  # weight's dtype
            target_row = target if sub is None else torch.where(target >= 0, target * k + sub.t_sub, -1)
            t_gain = row_gain * rest / sum_exp  # (B,) g0 (1 - p_y)
            parts = _BackwardParts(xhat_mm, w_mm, weight, inv_norm, target_row, t_gain, dpsi, grad_xhat, grad_w)
            c_row = None  # (B,) g0 p / exp(z - m_local): what scales the buffer into g0 p
            if buffer is not None or ctx.grad_filter is not None:
                c_row = row_gain * torch.exp(m_local - m_global) / sum_exp
            filtered = None
            if ctx.grad_filter is not None:  # decides which blocks run, from the forward's block maxima
                filtered = _FilteredBackward(ctx.grad_filter, parts, target, sub, g0, acc, x_norm,
                                             ctx.filter_fwd, c_row, m_local, chunk, num_local)
            if buffer is not None:  # materialized: buffer = exp(z - m_local) -> g0 p in place
                if filtered is not None:
                    filtered.materialized(buffer, buffer_arg, c_row)  # reads the kept blocks only
                else:
                    buffer.mul_(c_row.unsqueeze(1))
                    c_row = None  # freed before the products, as the unfiltered head always did
                    if sub is not None:
                        buffer = _to_rows(buffer, buffer_arg, k)
                    _grad_block(buffer, 0, num_local * k, parts)
            else:  # chunked: recompute each block of logits (filtered: only the runs of kept blocks)
                s_inv = row_gain / sum_exp
                col_scale = inv_norm * s
                for c0 in range(0, num_local, chunk):
                    c1 = min(c0 + chunk, num_local)
                    for kept, lo, hi in ([(True, c0, c1)] if filtered is None else filtered.runs(c0, c1)):
                        if not kept:
                            filtered.skip(lo, hi)
                            continue
                        z, factor, arg = _block_logits(xhat_mm, w_mm, col_scale, lo, hi, target, logit_t, acc,
                                                       ctx.neg, sub)
                        z.sub_(m_global.unsqueeze(1)).exp_().mul_(s_inv.unsqueeze(1))
                        if factor is not None:
                            z.mul_(factor)
                        if filtered is not None:
                            filtered.grad(z, lo, hi, arg)
                        else:
                            if arg is not None:
                                z = _to_rows(z, arg, k)
                            _grad_block(z, lo * k, hi * k, parts)
                        del z, factor, arg
            if filtered is not None:
                filtered.finish()
            # through x^ = x / |x|: (g - (g . x^) x^) / |x|
            radial = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(1)
            grad_x = (grad_xhat - radial * xhat) / x_norm
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None, None, None, None, None


def margin_softmax_cross_entropy(x_global: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 valid: torch.Tensor, margin: CombinedMargin, group: ProcessGroup = None,
                                 chunk_size: Optional[int] = None,
                                 mm_dtype: Optional[torch.dtype] = None, sub_centers: int = 1,
                                 grad_filter: Optional[GradFilterStats] = None):
    """Functional form of :class:`MarginSoftmaxCrossEntropy`: returns ``(loss, stats)``. ``grad_filter``:
    a :class:`partialfc.grad_filter.GradFilterStats` (eps, block size) that the backward fills in."""
    if mm_dtype is None:
        mm_dtype = torch.promote_types(x_global.dtype, weight.dtype)
    if weight.shape[0] % sub_centers:
        raise ValueError(f"margin_softmax_cross_entropy: {weight.shape[0]} weight rows are not a whole number of "
                         f"classes of sub_centers={sub_centers} rows")
    return MarginSoftmaxCrossEntropy.apply(x_global, weight, target, valid, margin, group, chunk_size, mm_dtype,
                                           sub_centers, grad_filter)

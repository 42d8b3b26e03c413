"""Certified gradient filtering (``PartialFC(grad_filter=...)``): what a step skipped and a bound on it.

The forward and the loss stay exact. In backward the softmax gradient of the margin head,

    G_ij = (s/N) (p_ij - [j = y_i]) f_ij                       (B_global, C_local), f = 1 except
                                                                CurricularFace's hard negatives,

is cut into blocks of ``grad_filter_block`` consecutive (local, sampled) classes (counted from each
chunk's first class in the chunked path). A block whose non-target entries are all below the
threshold, ``|p_ij f_ij| < eps`` for every row i and class j of the block, may be *skipped*: neither
backward product (``G' W`` for the embeddings, ``G'^T x^`` for the weights) runs on it, the chunked
path does not recompute its logits, and its weight rows get no gradient. The target entries are
never dropped: a row whose target class lies in a skipped block gets its target entry
``(s/N)(p_iy - 1) psi'(cos_iy) / n_y`` applied exactly, by a B-row correction.

How it is decided, without reading the blocks in backward: the forward's row maximum of the logits
is taken per block instead (the same maximum, bit for bit), which leaves the largest non-target
logit ``zmax_ib`` of each (row, block) (with CurricularFace: the largest ``z_ij + log|f_ij|``, two
more passes). The backward's entries are ``q_ij = c_i exp(z_ij - m_i) f_ij`` with a per-row ``c_i``
known at the start of backward, so ``est_ib = |c_i| exp(zmax_ib - m_i)`` is the block's largest
non-target ``|q_ij|`` up to rounding; a block is skipped when ``max_i est_ib (1 + 2^-10) < eps |g0|``.
The factor covers the few ulps by which the exponentials and products the exact rule would compare
can differ from the estimate, so every skipped block satisfies the rule above; a block within
2^-10 of the threshold may be kept (keeping is always safe). A NaN keeps its block. ``eps = 0``
keeps every block without a test: the unfiltered products, bit for bit.

Why the default ``eps`` is the accumulation dtype's machine epsilon (1.19e-7 in float32): the
threshold is relative to the row's gradient scale s/N. In that unit a row's target entry is
``p_iy - 1``, computed from ``p_iy`` stored in the accumulation dtype; near 1 consecutive floats are
``eps / 2`` apart, so the exact path already knows each row's largest entry only to about
``eps`` (relative errors of a few ulps in exp and the sum included). An entry below ``eps`` is below
that resolution. What many such entries add up to is not assumed small: it is bounded and reported.

``row_mass`` (B_global,) is the dropped softmax mass of each row, sum of the skipped p_ij |f_ij| (unitless).

The bound (exact arithmetic on the head's own probabilities; the rounding the exact path makes too
is not part of it). With ``x^_i`` of norm 1, ``w^_j = w_j / n_j`` and S the skipped (non-target)
entries, each dropped term of the weight row j's gradient is ``P_j((s/N) p_ij f_ij x^_i) / n_j`` with
``P_j = I - w^_j w^_j^T`` non-expansive, so

    |dropped dL/dw_j| <= (s/N) sum_{i: (i,j) in S} p_ij |f_ij| / n_j         (sub-centers: the
                                                                              largest 1/n of the
    weight_bound   = sqrt(sum_j (that)^2) >= ||dropped dL/dW_local||_F        class's k rows)

and for the embeddings, ``|dropped dL/dx^_i| <= (s/N) sum_j p_ij |f_ij|`` (|w^_j| = 1), then through
``x^ = x / |x|`` (a projection, then 1/|x_i|):

    row_bound_i    = (s/N) sum_{j: (i,j) in S} p_ij |f_ij| / |x_i|  >= |this rank's dropped part of dL/dx_i|

How ``weight_bound`` is formed depends on what the backward still has. With the materialized
(B, C_local) buffer (``chunk_size`` unset, no CurricularFace) it is the formula above: one
matrix-vector product over the skipped blocks of the buffer gives every column's sum. Where the
backward recomputes the logits instead (``chunk_size``, CurricularFace, a repeated backward), the
skipped blocks are not recomputed, and the bound comes from the forward's figures: with Q_b the
skipped entries of block b and X^ (B, d) the normalised embeddings (as multiplied),

    ||dropped dL/dW||_F^2 <= sum_b (max_{j in b} 1/n_j)^2 ||Q_b^T X^||_F^2,
    ||Q_b^T X^||_F <= min( ||X^||_2 ||Q_b||_F , sum_i ||q_ib|| ),   ||q_ib||^2 <= est_ib r_ib

(``||q_ib||^2 = sum_j q_ij^2 <= max_j |q_ij| sum_j |q_ij|``), ``r_ib`` the forward's sum of the
block's non-target exponentials of row i scaled like ``est`` (times the block's largest ``|f|``), and
``||X^||_2^2`` (largest eigenvalue of the Gram matrix G of the smaller side, float64) bounded by
``||G^4||_F^(1/4)`` with the rounding of each product carried along (about 1.35x the truth for
random rows with B = d). It is looser than the column form: 1.2-1.9x the true error in the tests'
small problems (the column form 1.05-1.4x, CurricularFace ~2x either way), 2.7-2.8x at B = d = 512
with trained-like logits (the column form 1.2-1.6x), because ``||X^||_2^2`` (~4 there) stands
for the mean eigenvalue (1) that a random Q_b sees. It is computed when first read
(:meth:`GradFilterStats.defer_weight_bound`). ``row_bound`` is the same in both paths (from the
forward's block sums ``r_ib``).

Both are local to the rank (no collective in the step). :meth:`GradFilterStats.global_bounds`
combines them over the group with one all-reduce of (2 B_global + 3,) values, when asked: the
Frobenius bound over all shards' weight gradients and, for the embeddings, the bound on the
dropped part of ``embeddings.grad`` as the head returns it (``embedding_grad_scale`` times the sum
over ranks), Frobenius over this rank's rows. The sums run in float64 and the bounds are widened
by ``8 eps`` of the accumulation dtype (the float32 block sums and matrix-vector products by the
worst case of their summation error as well).

With ``sparse_grad=True`` the weight gradient is a sparse COO tensor of only the rows of kept
blocks (and the target rows corrected in skipped ones): :class:`partialfc.optim.SparseSGD` then
moves only those rows, the optimizer work of sampling, chosen by importance instead of at random.

Cost: the per-block maxima replace the forward's row maximum (the same pass); one (B, blocks)
estimate and one host read of the blocks' keep mask per backward to pick the products to run;
contiguous kept blocks are merged into one product. The backward never reads, scales or recomputes
a skipped block. With a bound (``return_stats=True``): one more pass in forward (the block sums) and
either the matrix-vector product over the skipped part of the buffer or, when ``weight_bound`` is
read, three small float64 products (the Gram matrix, squared twice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from .collectives import ProcessGroup, all_reduce_, is_distributed

DEFAULT_BLOCK = 256  # classes per block: small enough to skip around the targets' neighbours, large enough for GEMMs


def default_eps(acc: torch.dtype) -> float:
    """Machine epsilon of the accumulation dtype (see the module docstring)."""
    return float(torch.finfo(acc).eps)


class GradFilterBounds(NamedTuple):
    """The step's filter figures over the whole group (:meth:`GradFilterStats.global_bounds`)."""
    skipped_fraction: float         # skipped blocks / blocks, all ranks
    weight_bound: torch.Tensor      # () >= ||dropped part of dL/dW||_F over all shards
    embedding_bound: torch.Tensor   # () >= ||dropped part of embeddings.grad||_F, this rank's rows
    row_bound: torch.Tensor         # (B_global,) >= |dropped part of dL/dx_i| (exact gradient, no grad scale)
    row_mass: torch.Tensor          # (B_global,) dropped softmax mass sum_j p_ij |f_ij| of each row, all ranks


@dataclass
class GradFilterStats:
    """What the backward of one step skipped, filled in by that backward (``ready``).

    Created by each forward of a head with ``grad_filter``; ``head.last_filter_stats`` is the
    latest, and ``HeadStats.grad_filter`` is the same object when ``return_stats=True``. The
    bounds (``weight_bound``, ``row_bound``) are computed only for a forward run with
    ``return_stats=True``: they cost one more pass over the logits in forward (block sums) and one over
the skipped blocks of the materialized buffer in backward (see the module docstring).

    Local to this rank: ``blocks``/``skipped_blocks`` (ints), ``weight_bound`` (tensor ()) bounds the
    Frobenius norm of the dropped part of this rank's weight-shard gradient, ``row_bound`` (B_global,)
    each global row's dropped part of this rank's contribution to dL/dx_i, ``row_mass`` (B_global,) each
    row's dropped softmax mass on this rank (the sum of the skipped ``p_ij |f_ij|``).
    """

    eps: Optional[float]             # None: :func:`default_eps` of the accumulation dtype (set in backward)
    block: int = DEFAULT_BLOCK
    with_bounds: bool = False
    group: ProcessGroup = None
    local_rows: tuple = (0, 0)       # [lo, hi) of this rank's rows in the global batch
    embedding_grad_scale: float = 1.0
    ready: bool = False
    blocks: int = 0
    skipped_blocks: int = 0
    weight_bound: Optional[torch.Tensor] = None
    row_bound: Optional[torch.Tensor] = None
    row_mass: Optional[torch.Tensor] = None  # (B_global,) sum of p_ij |f_ij| over the skipped entries (unitless)
    kept_rows: Optional[torch.Tensor] = field(default=None, repr=False)  # (rows,) bool: rows given a gradient
    # set by SelectRowsKept (sparse_grad): the loss's weight gradient is read at the kept rows only, so the
    # backward leaves the skipped rows unwritten instead of zero-filling them
    rows_kept_only: bool = field(default=False, repr=False)

    def __getstate__(self):
        self.weight_bound  # a deferred bound is computed now (a closure does not pickle)
        state = dict(self.__dict__)
        state["group"] = None  # a process group does not pickle (a pickled head keeps its last stats)
        return state

    def defer_weight_bound(self, compute: Callable[[], torch.Tensor]) -> None:
        """``weight_bound`` becomes ``compute()``, evaluated on first read: the recomputing backward's
        bound needs two small float64 products (:func:`partialfc.softmax._gram_bound`) that a caller
        reading only ``skipped_fraction`` (the trainer's history) should not pay for."""
        self.__dict__["_weight_bound"], self.__dict__["_weight_bound_compute"] = None, compute

    @property
    def skipped_fraction(self) -> float:
        """Skipped blocks / blocks on this rank (0 before backward)."""
        return self.skipped_blocks / self.blocks if self.blocks else 0.0

    def global_bounds(self) -> GradFilterBounds:
        """Combine the ranks' figures: one all-reduce SUM of (2 B_global + 3,) values. Collective: every
        rank of the group calls it after the same backward. Needs ``return_stats=True`` on that forward."""
        if not self.ready or self.row_bound is None:
            raise RuntimeError("GradFilterStats.global_bounds: run backward of a forward called with "
                               "return_stats=True first (the bounds are computed only then)")
        rb, b = self.row_bound, self.row_bound.shape[0]
        packed = torch.cat([rb.to(torch.float64), self.row_mass.to(torch.float64), torch.stack([
            self.weight_bound.to(torch.float64).square(),
            torch.tensor(float(self.skipped_blocks), dtype=torch.float64, device=rb.device),
            torch.tensor(float(self.blocks), dtype=torch.float64, device=rb.device)])])
        if is_distributed(self.group):
            all_reduce_(packed, "sum", self.group)
        rows, mass = packed[:b], packed[b:2 * b]
        lo, hi = self.local_rows
        skipped, blocks = float(packed[-2]), float(packed[-1])
        return GradFilterBounds(skipped / blocks if blocks else 0.0, packed[-3].sqrt(),
                                self.embedding_grad_scale * torch.linalg.vector_norm(rows[lo:hi]), rows, mass)


def _get_weight_bound(self) -> Optional[torch.Tensor]:
    compute = self.__dict__.get("_weight_bound_compute")
    if compute is not None:
        self.__dict__["_weight_bound"], self.__dict__["_weight_bound_compute"] = compute(), None
    return self.__dict__.get("_weight_bound")


def _set_weight_bound(self, value: Optional[torch.Tensor]) -> None:
    self.__dict__["_weight_bound"], self.__dict__["_weight_bound_compute"] = value, None


# a property over the dataclass field: set as usual, or deferred by GradFilterStats.defer_weight_bound
GradFilterStats.weight_bound = property(_get_weight_bound, _set_weight_bound,
                                        doc="() >= ||dropped part of this rank's dL/dW||_F (None without a bound)")


class SelectRowsKept(torch.autograd.Function):
    """forward: ``weight[rows]`` (rows, d), a view of ``weight`` when ``rows`` is every row in order (no
    copy). backward: a sparse COO gradient (the ``nn.Embedding(sparse=True)`` layout) holding only the
    rows the filter kept (``stats.kept_rows``, written by the loss's backward, which runs first and,
    told by ``stats.rows_kept_only``, does not write the others)."""

    @staticmethod
    def forward(ctx, weight, rows, stats: GradFilterStats):
        ctx.save_for_backward(rows)
        ctx.stats, ctx.shape = stats, weight.shape
        stats.rows_kept_only = True
        n = weight.shape[0]
        if rows.numel() == n and bool((rows == torch.arange(n, device=rows.device)).all()):
            return weight.view_as(weight)
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        rows, = ctx.saved_tensors
        kept = ctx.stats.kept_rows
        if kept is not None:
            pos = kept.nonzero().squeeze(1)
            rows, grad = rows.index_select(0, pos), grad.index_select(0, pos)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.shape, check_invariants=False), None, None

"""The fused path of the sharded margin-softmax cross-entropy: no (B_global, C_local) tensor exists.

Same inputs, outputs, math and collectives as :class:`partialfc.softmax.MarginSoftmaxCrossEntropy`
(read its module docstring for the formulas); only the work over the (B, C_local) logits moves into
Triton kernels (:mod:`partialfc.triton_kernels`) that form each (rows x classes) tile on chip:

    forward   torch: x^ = x/|x|, 1/|w_j| (C_local k,), the B target cosines (from the B k target
              rows; with k > 1 sub-centers the largest, and which row won), psi and psi' (the margin
              runs on the B target entries exactly as in the torch path, so every CombinedMargin and
              per-row margin such as AdaFace works unchanged); CurricularFace only: all-reduce SUM of
              the target cosines (B,) and ``margin.negatives`` (advances its running t, once per
              forward) -> per-row thresholds (B,) and t;
              kernel: per tile x^ W^T * s/|w_j| (k > 1: max over each class's k rows; CurricularFace:
              hard negatives reshaped), target entry replaced, online row max / sum-exp -> partial
              (max, sum-exp) per row and class split, combined in torch (O(splits * B));
              all-reduce MAX (B,) then all-reduce SUM (4, B): the same collectives as the torch path.
    backward  kernel 1 (row blocks x class splits): recompute, G', grad_x^ += G' W_tile (fp32, B x d);
              kernel 2 (class blocks): recompute, A = G'^T x^ in registers, radial projection, write
              dL/dW in the weight's dtype; the projection through x^ = x/|x| in torch (O(B d)).
              With sub-centers each G'_ij goes to the row that won class j's max (the target's: the
              row found in forward), with CurricularFace a hard negative's p_ij is multiplied by
              t + 2 cos_ij (t constant; neither recomputes t nor calls the margin again).
              No collective.

Extra memory beyond the inputs and gradients: x^ (B, d) in the accumulation dtype and the product
dtype, grad_x^ (B, d) in the accumulation dtype, 1/|w_j| (C_local k,), O(splits * B) row statistics
(with sub-centers the B target rows' indices, with CurricularFace the B thresholds). Sub-centers
(``sub_centers = k``) and CurricularFace are compile-time switches of the kernels: the plain kernels
are unchanged, and no (B, C_local) nor (B, C_local k) tensor exists on any of these paths.

Not fused (it runs the torch path, with a one-time warning): ``grad_filter``, and any option the torch
function has that this one does not (passed through ``**torch_options``). The products accumulate in
float32 (float64 for float64 inputs); fp32 products use full-precision ("ieee") dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set.

The two kernel stages are the custom ops ``torch.ops.partialfc.fused_lse_stats`` and
``fused_margin_grads`` (:mod:`partialfc.triton_ops`, with the tile settings): functional, no
collective inside, with fake implementations, so ``FakeTensorMode`` (the planner,
``plan_memory(impl="triton")``) and ``torch.compile`` trace them without launching a kernel.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first call
(Triton's interpreter: slow, for tests). This module imports without triton; the kernels are
imported at the first call.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import Optional

import torch

from .collectives import ProcessGroup, all_reduce_, refuse_double_backward
from .margin import CombinedMargin
from .softmax import (_NORM_EPS, _accumulation_dtype, combine_shards, margin_softmax_cross_entropy, safe_normalize,
                      target_cosines)
from .triton_ops import fake_mode_active, interpreting  # also registers torch.ops.partialfc.*

IMPLS = ("auto", "torch", "triton")
_MM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> bool:
    """True when the ``triton`` package is installed (found without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def check_impl(impl: str) -> str:
    """Validate a ``PartialFC(impl=...)`` value at construction; returns it."""
    if impl not in IMPLS:
        raise ValueError(f"PartialFC: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not triton_available():
        raise ValueError('PartialFC(impl="triton") needs the triton package: pip install "partialfc[triton]" '
                         '(or impl="auto", which uses the torch path without it)')
    return impl


def use_triton(impl: str, device: torch.device) -> bool:
    """Which path a forward on ``device`` takes: ``"auto"`` = triton on CUDA when triton is installed.
    ``"triton"`` on a non-CUDA device raises unless Triton's CPU interpreter is on, or a
    ``FakeTensorMode`` is active (the planner: the ops' fake implementations run, no kernel)."""
    if impl == "torch":
        return False
    if impl == "auto":
        return device.type == "cuda" and triton_available()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()) and not fake_mode_active():
        raise RuntimeError(f'PartialFC(impl="triton") runs on CUDA tensors; got {device.type} tensors. On the CPU '
                           'it runs only under Triton\'s interpreter (set TRITON_INTERPRET=1 before the first '
                           'forward; slow, meant for tests); use impl="torch" or "auto" here.')
    return True


_warned: set = set()


def _fallback_reason(torch_options: dict) -> Optional[str]:
    used = sorted(k for k, v in torch_options.items() if v is not None and v is not False)
    if used:
        return f"option(s) {', '.join(used)}"
    return None


def triton_margin_softmax_cross_entropy(x_global: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        valid: torch.Tensor, margin: CombinedMargin, group: ProcessGroup = None,
                                        chunk_size: Optional[int] = None, mm_dtype: Optional[torch.dtype] = None,
                                        sub_centers: int = 1, grad_filter=None, **torch_options):
    """Drop-in for :func:`partialfc.softmax.margin_softmax_cross_entropy`: returns ``(loss, stats)``.
    ``chunk_size`` is ignored (the kernels never keep logits). ``sub_centers`` and CurricularFace (a
    margin with ``negatives``) run fused; unsupported cases (``grad_filter``, see the module
    docstring) run the torch function with the same arguments after a one-time warning."""
    if grad_filter is not None:
        torch_options["grad_filter"] = grad_filter
    reason = _fallback_reason(torch_options)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"PartialFC: the triton path does not fuse {reason} yet; running the torch path "
                          "(same result, keeps (B, C_local) logits or chunks of them)", stacklevel=2)
        return margin_softmax_cross_entropy(x_global, weight, target, valid, margin, group, chunk_size, mm_dtype,
                                            sub_centers, **torch_options)
    if mm_dtype is None:
        mm_dtype = torch.promote_types(x_global.dtype, weight.dtype)
    if mm_dtype not in _MM_DTYPES:
        raise ValueError(f"triton margin softmax: unsupported product dtype {mm_dtype}")
    if weight.shape[0] % sub_centers:
        raise ValueError(f"triton margin softmax: {weight.shape[0]} weight rows are not a whole number of classes "
                         f"of sub_centers={sub_centers} rows")
    return TritonMarginSoftmaxCrossEntropy.apply(x_global, weight, target, valid, margin, group, mm_dtype,
                                                 sub_centers)


# ---------------------------------------------------------------------------------------------
class TritonMarginSoftmaxCrossEntropy(torch.autograd.Function):
    """forward: fused sharded margin softmax cross-entropy, all-reduce MAX then all-reduce SUM.
    backward: exact gradients for ``x_global`` and ``weight`` from two fused kernels, no collective.

    Inputs as :class:`partialfc.softmax.MarginSoftmaxCrossEntropy` (``sub_centers`` k consecutive
    weight rows per class; a margin with ``negatives``, CurricularFace, adds its one (B,) all-reduce
    and is asked for the thresholds once, in forward); returns the loss (scalar, identical on every
    rank) and the non-differentiable ``stats`` (3, B). The kernels run as the custom ops
    ``torch.ops.partialfc.fused_lse_stats`` (forward) and ``fused_margin_grads`` (backward) of
    :mod:`partialfc.triton_ops`; the collectives stay here.
    """

    @staticmethod
    def forward(ctx, x_global, weight, target, valid, margin, group: ProcessGroup, mm_dtype: torch.dtype,
                sub_centers: int = 1):
        acc = _accumulation_dtype(mm_dtype)
        with torch.autocast(x_global.device.type, enabled=False):
            weight = weight if weight.stride(-1) == 1 else weight.contiguous()
            s = float(margin.s)
            xhat, x_norm = safe_normalize(x_global.to(acc))  # (B, d), (B, 1)
            inv_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc).clamp_min(_NORM_EPS).reciprocal()  # (C k,)
            owned = target >= 0
            cos_t, t_sub = target_cosines(xhat, weight, inv_norm, target, sub_centers)  # (B,), (B,) or None
            psi, dpsi = margin.psi_and_grad(cos_t)
            logit_t = (s * psi).to(acc).contiguous()
            dpsi = dpsi.to(acc).contiguous()
            target = target.contiguous()
            thr = t = None
            if hasattr(margin, "negatives"):  # every rank needs each row's threshold: one extra (B,) all-reduce
                cos_all = all_reduce_(torch.where(owned, cos_t, 0.0), "sum", group)
                neg = margin.negatives(cos_all, valid)  # advances CurricularFace's t: here only, never in backward
                thr = neg.thr.to(acc).contiguous()  # (B,)
                t = neg.t.detach().to(acc, copy=True).reshape(1)  # (1,): a copy, the buffer moves on next step
            m_local, s_local, r_local = torch.ops.partialfc.fused_lse_stats(
                xhat.to(mm_dtype), weight, inv_norm, target, logit_t, s, sub_centers, t_sub, thr, t)  # (B,) each
            loss, m_global, sum_exp, rest, t_global, cos_global, n_valid = combine_shards(
                m_local, s_local, r_local, owned, logit_t, cos_t, valid, acc, group)

        ctx.margin_s, ctx.mm_dtype, ctx.acc, ctx.x_dtype = s, mm_dtype, acc, x_global.dtype
        ctx.sub_centers = sub_centers
        ctx.save_for_backward(xhat, x_norm, weight, inv_norm, target, valid, dpsi, logit_t, m_global,
                              sum_exp, rest, n_valid, t_sub, thr, t)
        out_stats = torch.stack([m_global, t_global, cos_global])
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_double_backward("the margin softmax loss")
        xhat, x_norm, weight, inv_norm, target, valid, dpsi, logit_t, m_global, sum_exp, rest, n_valid, \
            t_sub, thr, t = ctx.saved_tensors
        s, mm_dtype, acc = ctx.margin_s, ctx.mm_dtype, ctx.acc
        with torch.autocast(xhat.device.type, enabled=False):
            g0 = grad_loss.to(acc) * s / n_valid  # scalar: d loss / d logit * s
            gain = torch.where(valid, g0, 0.0)  # (B,)
            coef = gain / sum_exp  # (B,): g0 p_ij = exp(z_ij - m_i) coef_i
            t_gain = gain * rest / sum_exp  # (B,): g0 (1 - p_y), exact when tiny
            grad_xhat, grad_w = torch.ops.partialfc.fused_margin_grads(
                xhat.to(mm_dtype), weight, inv_norm, s, target, logit_t, m_global, coef, t_gain, dpsi,
                ctx.sub_centers, t_sub, thr, t)
            # (B, d) accumulation dtype, (C_local k, d) weight's dtype; through x^ = x / |x|: (g - (g . x^) x^) / |x|
            radial = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(1)
            grad_x = (grad_xhat - radial * xhat) / x_norm
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None, None, None

"""The fused path of the sharded margin-softmax cross-entropy: no (B_global, C_local) tensor exists.

Same inputs, outputs, math and collectives as :class:`partialfc.softmax.MarginSoftmaxCrossEntropy`
(read its module docstring for the formulas); only the work over the (B, C_local) logits moves into
Triton kernels (:mod:`partialfc.triton_kernels`) that form each (rows x classes) tile on chip:

    forward   torch: x^ = x/|x|, 1/|w_j| (C_local,), the B target cosines, psi and psi' (the margin
              runs on the B target entries exactly as in the torch path, so every CombinedMargin and
              per-row margin such as AdaFace works unchanged);
              kernel: per tile x^ W^T * s/|w_j|, target entry replaced, online row max / sum-exp ->
              partial (max, sum-exp) per row and class split, combined in torch (O(splits * B));
              all-reduce MAX (B,) then all-reduce SUM (3, B): the same 2 collectives.
    backward  kernel 1 (row blocks x class splits): recompute, G', grad_x^ += G' W_tile (fp32, B x d);
              kernel 2 (class blocks): recompute, A = G'^T x^ in registers, radial projection, write
              dL/dW in the weight's dtype; the projection through x^ = x/|x| in torch (O(B d)).
              No collective.

Extra memory beyond the inputs and gradients: x^ (B, d) in the accumulation dtype and the product
dtype, grad_x^ (B, d) in the accumulation dtype, 1/|w_j| (C_local,), O(splits * B) row statistics.

Not fused (they run the torch path, with a one-time warning): margins that reshape the negatives
(:class:`partialfc.CurricularFace`), ``sub_centers > 1``, and any option the torch function has that
this one does not (passed through ``**torch_options``). The products accumulate in float32 (float64
for float64 inputs); fp32 products use full-precision ("ieee") dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first call
(Triton's interpreter: slow, for tests). This module imports without triton; the kernels are
imported at the first call.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import warnings
from typing import Optional

import torch

from .collectives import ProcessGroup, refuse_double_backward
from .margin import CombinedMargin
from .softmax import _NORM_EPS, _accumulation_dtype, combine_shards, margin_softmax_cross_entropy, safe_normalize

IMPLS = ("auto", "torch", "triton")
#: (BLOCK_B, BLOCK_C) per kernel and where it runs; the interpreter pays per tile, not per element.
#: On CUDA the kernels keep a full-width (rows, d) float32 accumulator in registers (grad_x: BLOCK_B x d,
#: grad_w: BLOCK_C x d), hence the 32-row / 32-class tiles there; untuned first guesses (no GPU yet)
TILES = {"cuda": {"forward": (64, 64), "grad_x": (32, 64), "grad_w": (64, 32)},
         "interpret": {"forward": (32, 64), "grad_x": (32, 64), "grad_w": (32, 64)}}
NUM_WARPS = 8
#: class splits of the row-block kernels: None = enough programs to fill the device
SPLITS: dict[str, Optional[int]] = {"cuda": None, "interpret": 2}
_MM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> bool:
    """True when the ``triton`` package is installed (found without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    ``"triton"`` on a non-CUDA device raises unless Triton's CPU interpreter is on."""
    if impl == "torch":
        return False
    if impl == "auto":
        return device.type == "cuda" and triton_available()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise RuntimeError(f'PartialFC(impl="triton") runs on CUDA tensors; got {device.type} tensors. On the CPU '
                           'it runs only under Triton\'s interpreter (set TRITON_INTERPRET=1 before the first '
                           'forward; slow, meant for tests); use impl="torch" or "auto" here.')
    return True


_warned: set = set()


def _fallback_reason(margin, sub_centers: int, torch_options: dict) -> Optional[str]:
    if sub_centers > 1:
        return "sub_centers > 1"
    if hasattr(margin, "negatives"):
        return f"a margin that reshapes the negatives ({type(margin).__name__})"
    used = sorted(k for k, v in torch_options.items() if v is not None and v is not False)
    if used:
        return f"option(s) {', '.join(used)}"
    return None


def triton_margin_softmax_cross_entropy(x_global: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        valid: torch.Tensor, margin: CombinedMargin, group: ProcessGroup = None,
                                        chunk_size: Optional[int] = None, mm_dtype: Optional[torch.dtype] = None,
                                        sub_centers: int = 1, grad_filter=None, **torch_options):
    """Drop-in for :func:`partialfc.softmax.margin_softmax_cross_entropy`: returns ``(loss, stats)``.
    ``chunk_size`` is ignored (the kernels never keep logits). Unsupported cases (see the module
    docstring; ``grad_filter`` is one) run the torch function with the same arguments after a
    one-time warning."""
    if grad_filter is not None:
        torch_options["grad_filter"] = grad_filter
    reason = _fallback_reason(margin, sub_centers, torch_options)
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
    return TritonMarginSoftmaxCrossEntropy.apply(x_global, weight, target, valid, margin, group, mm_dtype)


# ---------------------------------------------------------------------------------------------
class _Launch:
    """Kernel settings for one call: tiles, split count, dtypes as Triton types."""

    def __init__(self, device: torch.device, mm_dtype: torch.dtype, acc: torch.dtype, d: int):
        import triton.language as tl
        where = "cuda" if device.type == "cuda" else "interpret"
        self.tiles, self.splits = TILES[where], SPLITS[where]
        self.block_d = max(16, 1 << max(0, d - 1).bit_length())
        tl_of = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                 torch.float64: tl.float64}
        # the interpreter multiplies bfloat16 tiles as raw 16-bit integers (triton 3.9): widen them first,
        # which is exact (a product of two bf16 values fits a float32) and keeps the float32 accumulation
        mm = torch.float32 if where == "interpret" and mm_dtype == torch.bfloat16 else mm_dtype
        self.mm, self.acc = tl_of[mm], tl_of[acc]
        self.ieee = mm in (torch.float32, torch.float64) and not (
            mm == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 1

    def split(self, kernel: str, b: int, c: int) -> tuple[int, int, int]:
        """(row blocks, splits, class blocks per split) of a row-block kernel."""
        bb, bc = self.tiles[kernel]
        row_blocks, class_blocks = math.ceil(b / bb), math.ceil(c / bc)
        splits = self.splits if self.splits is not None else math.ceil(4 * self.num_sms / max(row_blocks, 1))
        per = math.ceil(class_blocks / max(1, min(splits, class_blocks)))
        return row_blocks, math.ceil(class_blocks / per), per


def _forward_stats(xhat_mm, weight, inv_norm, target, logit_t, scale, launch: _Launch):
    """Per-row (max, sum-exp, sum-exp without the target) over this shard's classes: three (B,) in the
    accumulation dtype."""
    from . import triton_kernels as k
    b, d = xhat_mm.shape
    c = weight.shape[0]
    acc = inv_norm.dtype
    if c == 0 or b == 0:
        zeros = xhat_mm.new_zeros(b, dtype=acc)
        return torch.full((b,), -math.inf, dtype=acc, device=xhat_mm.device), zeros, zeros.clone()
    row_blocks, splits, per = launch.split("forward", b, c)
    m_parts = torch.empty(splits, b, dtype=acc, device=xhat_mm.device)
    s_parts = torch.empty(splits, b, dtype=acc, device=xhat_mm.device)
    r_parts = torch.empty(splits, b, dtype=acc, device=xhat_mm.device)
    bb, bc = launch.tiles["forward"]
    k.forward_kernel[(row_blocks, splits)](
        xhat_mm, weight, inv_norm, scale, target, logit_t, m_parts, s_parts, r_parts, b, c, d, xhat_mm.stride(0),
        weight.stride(0), per, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=launch.block_d, MM=launch.mm, ACC=launch.acc,
        IEEE=launch.ieee, num_warps=NUM_WARPS)
    if splits == 1:
        return m_parts[0], s_parts[0], r_parts[0]
    m_local = m_parts.amax(dim=0)
    rescale = torch.exp(m_parts - m_local)  # (splits, B)
    return m_local, (s_parts * rescale).sum(dim=0), (r_parts * rescale).sum(dim=0)


class TritonMarginSoftmaxCrossEntropy(torch.autograd.Function):
    """forward: fused sharded margin softmax cross-entropy, all-reduce MAX then all-reduce SUM.
    backward: exact gradients for ``x_global`` and ``weight`` from two fused kernels, no collective.

    Inputs as :class:`partialfc.softmax.MarginSoftmaxCrossEntropy` with one weight row per class;
    returns the loss (scalar, identical on every rank) and the non-differentiable ``stats`` (3, B).
    """

    @staticmethod
    def forward(ctx, x_global, weight, target, valid, margin, group: ProcessGroup, mm_dtype: torch.dtype):
        acc = _accumulation_dtype(mm_dtype)
        with torch.autocast(x_global.device.type, enabled=False):
            launch = _Launch(x_global.device, mm_dtype, acc, x_global.shape[1])
            weight = weight if weight.stride(-1) == 1 else weight.contiguous()
            s = float(margin.s)
            scale = torch.tensor([s], dtype=acc, device=x_global.device)
            xhat, x_norm = safe_normalize(x_global.to(acc))  # (B, d), (B, 1)
            inv_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc).clamp_min(_NORM_EPS).reciprocal()  # (C,)
            owned = target >= 0
            if weight.shape[0]:
                t_row = target.clamp_min(0)
                w_t = weight.index_select(0, t_row).to(acc)  # (B, d): the target rows only
                cos_t = (torch.linalg.vecdot(xhat, w_t) * inv_norm[t_row]).clamp(-1.0, 1.0)
            else:
                cos_t = xhat.new_zeros(xhat.shape[0])
            psi, dpsi = margin.psi_and_grad(cos_t)
            logit_t = (s * psi).to(acc).contiguous()
            dpsi = dpsi.to(acc).contiguous()
            xhat_mm = xhat.to(mm_dtype).contiguous()
            target = target.contiguous()
            m_local, s_local, r_local = _forward_stats(xhat_mm, weight, inv_norm, target, logit_t, scale, launch)
            del xhat_mm
            loss, m_global, sum_exp, rest, t_global, cos_global, n_valid = combine_shards(
                m_local, s_local, r_local, owned, logit_t, cos_t, valid, acc, group)

        ctx.margin_s, ctx.mm_dtype, ctx.acc, ctx.x_dtype, ctx.launch = s, mm_dtype, acc, x_global.dtype, launch
        ctx.save_for_backward(xhat, x_norm, weight, inv_norm, scale, target, valid, dpsi, logit_t, m_global,
                              sum_exp.contiguous(), rest, n_valid)
        out_stats = torch.stack([m_global, t_global, cos_global])
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        refuse_double_backward("the margin softmax loss")
        from . import triton_kernels as k
        xhat, x_norm, weight, inv_norm, scale, target, valid, dpsi, logit_t, m_global, sum_exp, rest, n_valid = \
            ctx.saved_tensors
        s, mm_dtype, acc, launch = ctx.margin_s, ctx.mm_dtype, ctx.acc, ctx.launch
        with torch.autocast(xhat.device.type, enabled=False):
            b, d = xhat.shape
            c = weight.shape[0]
            g0 = grad_loss.to(acc) * s / n_valid  # scalar: d loss / d logit * s
            gain = torch.where(valid, g0, 0.0).contiguous()  # (B,)
            coef = (gain / sum_exp).contiguous()  # (B,): g0 p_ij = exp(z_ij - m_i) coef_i
            t_gain = (gain * rest / sum_exp).contiguous()  # (B,): g0 (1 - p_y), exact when tiny
            m_global = m_global.contiguous()
            xhat_mm = xhat.to(mm_dtype).contiguous()
            grad_xhat = torch.zeros_like(xhat)  # (B, d) accumulation dtype
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)  # weight's dtype
            common = dict(BLOCK_D=launch.block_d, MM=launch.mm, ACC=launch.acc, IEEE=launch.ieee,
                          num_warps=NUM_WARPS)
            if b and c:
                row_blocks, splits, per = launch.split("grad_x", b, c)
                bb, bc = launch.tiles["grad_x"]
                k.grad_x_kernel[(row_blocks, splits)](
                    xhat_mm, weight, inv_norm, scale, target, logit_t, m_global, coef, t_gain, dpsi, grad_xhat,
                    b, c, d, xhat_mm.stride(0), weight.stride(0), grad_xhat.stride(0), per,
                    BLOCK_B=bb, BLOCK_C=bc, ATOMIC=splits > 1, **common)
                bb, bc = launch.tiles["grad_w"]
                k.grad_w_kernel[(math.ceil(c / bc),)](
                    xhat_mm, weight, inv_norm, scale, target, logit_t, m_global, coef, t_gain, dpsi, grad_w,
                    b, c, d, xhat_mm.stride(0), weight.stride(0), grad_w.stride(0),
                    BLOCK_B=bb, BLOCK_C=bc, **common)
            elif c:
                grad_w.zero_()
            # through x^ = x / |x|: (g - (g . x^) x^) / |x|
            radial = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(1)
            grad_x = (grad_xhat - radial * xhat) / x_norm
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None, None

"""The two kernel stages of the fused path as PyTorch custom ops, ``torch.ops.partialfc.*``.

    fused_lse_stats(xhat_mm, weight, inv_norm, target, logit_t, scale, sub_centers=1, t_sub=None,
                    thr=None, t=None) -> (m_local, s_local, r_local)
        per row, over this shard's classes: max logit, sum-exp and sum-exp without the target,
        three (B,) in the accumulation dtype (``forward_kernel``, partial splits combined here).
    fused_margin_grads(xhat_mm, weight, inv_norm, scale, target, logit_t, m_global, coef, t_gain, dpsi,
                       sub_centers=1, t_sub=None, thr=None, t=None) -> (grad_xhat, grad_w)
        dL/dx^ (B, d) in the accumulation dtype (``grad_x_kernel``) and dL/dW (C_local k, d),
        contiguous, in the weight's dtype (``grad_w_kernel``).

Inputs: ``xhat_mm`` (B, d) normalised embeddings in the product dtype; ``weight`` (C_local k, d) as
stored, k = ``sub_centers`` consecutive rows per class; ``inv_norm`` (C_local k,) 1/|w_j| in the
accumulation dtype (float32, float64 for float64 products: the ops read it from this tensor);
``target`` (B,) int64 local class or -1; ``logit_t``, ``m_global``, ``coef``, ``t_gain``, ``dpsi``
(B,) in the accumulation dtype; ``scale`` the margin's s. Optional, each a compile-time switch of the
kernels (absent: the plain kernels, unchanged):

- ``sub_centers`` k > 1 with ``t_sub`` (B,) int64: the row (0 ... k-1) of each target class nearest
  to the row's embedding, the one its margin logit and gradient use (any value where target = -1);
- ``thr`` (B,) and ``t`` (1,) in the accumulation dtype, both or neither: CurricularFace's hard
  negatives (non-targets with cos > thr_i become s cos (t + cos)).

The math is in :mod:`partialfc.triton_kernels` and :mod:`partialfc.triton_softmax`.

Why ops: under ``FakeTensorMode`` (the planner, :mod:`partialfc.plan`), ``torch.compile`` and export a
Triton launch is opaque; as ops with fake implementations (shapes and dtypes, no kernel) they are
traced like any aten op. They are functional (allocate their outputs, mutate nothing), run no
collective (a process group is no op argument: the all-reduces stay in
:func:`partialfc.softmax.combine_shards`) and have no autograd formula (they run inside
:class:`partialfc.triton_softmax.TritonMarginSoftmaxCrossEntropy`'s forward and backward). An empty
batch or shard launches nothing. Registering them needs torch only; triton is imported at the first
real call. Beyond its outputs an op allocates O(splits * B) row statistics (not seen by the planner).
"""
import math
import os
from typing import Optional

import torch
from torch import Tensor

#: (BLOCK_B, BLOCK_C) per kernel and where it runs; the interpreter pays per tile, not per element.
#: On CUDA the kernels keep a full-width (rows, d) float32 accumulator in registers (grad_x: BLOCK_B x d,
#: grad_w: BLOCK_C x d), hence the 32-row / 32-class tiles there; untuned first guesses (no GPU yet)
TILES = {"cuda": {"forward": (64, 64), "grad_x": (32, 64), "grad_w": (64, 32)},
         "interpret": {"forward": (32, 64), "grad_x": (32, 64), "grad_w": (32, 64)}}
NUM_WARPS = 8
#: class splits of the row-block kernels: None = enough programs to fill the device
SPLITS: dict = {"cuda": None, "interpret": 2}


def _slots(k: int) -> int:
    """Slots per class of a sub-center tile: ``k`` rounded up to a power of two (1 without sub-centers)."""
    return 1 << max(0, k - 1).bit_length()


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Launch:
    """Kernel settings for one call: tiles, split count, dtypes as Triton types."""

    def __init__(self, device: torch.device, mm_dtype: torch.dtype, acc: torch.dtype, d: int):
        import triton.language as tl
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise RuntimeError(f"partialfc triton ops: kernels run on CUDA tensors, or on CPU tensors under "
                               f"Triton's interpreter (TRITON_INTERPRET=1); got {device.type} tensors")
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

    def tile(self, kernel: str, k: int = 1) -> tuple:
        """(BLOCK_B rows, BLOCK_C classes, KP slots per class) of ``kernel`` with ``k`` weight rows per
        class: KP = k rounded up to a power of two, and a class tile spans the plain tile's width in
        weight rows, ``BLOCK_C * KP`` (at least one class)."""
        bb, bc = self.tiles[kernel]
        kp = _slots(k)
        return bb, max(1, bc // kp), kp

    def split(self, kernel: str, b: int, c: int, k: int = 1) -> tuple:
        """(row blocks, splits, class blocks per split) of a row-block kernel over ``c`` classes."""
        bb, bc, _ = self.tile(kernel, k)
        row_blocks, class_blocks = math.ceil(b / bb), math.ceil(c / bc)
        splits = self.splits if self.splits is not None else math.ceil(4 * self.num_sms / max(row_blocks, 1))
        per = math.ceil(class_blocks / max(1, min(splits, class_blocks)))
        return row_blocks, math.ceil(class_blocks / per), per

    def common(self) -> dict:
        return dict(BLOCK_D=self.block_d, MM=self.mm, ACC=self.acc, IEEE=self.ieee, num_warps=NUM_WARPS)


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dim (the kernels take a row stride, nothing else)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale(scale: float, acc: torch.dtype, device) -> Tensor:
    return torch.full((1,), scale, dtype=acc, device=device)  # the kernels load s from memory (a fill, no copy)


def _switches(weight: Tensor, b: int, acc: torch.dtype, sub_centers: int, t_sub: Optional[Tensor],
              thr: Optional[Tensor], t: Optional[Tensor]) -> tuple:
    """Checks the optional arguments: ``(classes, (t_sub, thr, t) as the kernels read them (None when
    off), dict(K, KP, HARD) without the tile)``."""
    if isinstance(sub_centers, bool) or sub_centers < 1 or weight.shape[0] % sub_centers:
        raise ValueError(f"partialfc triton ops: sub_centers must be >= 1 and divide the {weight.shape[0]} "
                         f"weight rows, got {sub_centers}")
    if (t_sub is not None) != (sub_centers > 1):
        raise ValueError("partialfc triton ops: t_sub (B,) is required with sub_centers > 1, and only then")
    if (thr is None) != (t is None):
        raise ValueError("partialfc triton ops: thr and t (CurricularFace) go together")
    for name, v, n in (("t_sub", t_sub, b), ("thr", thr, b), ("t", t, 1)):
        if v is not None and v.numel() != n:
            raise ValueError(f"partialfc triton ops: {name} must have {n} element(s), got {tuple(v.shape)}")
    if t_sub is not None:
        t_sub = t_sub.contiguous()
    if thr is not None:
        thr, t = thr.to(acc).contiguous(), t.to(acc).reshape(1)
    return weight.shape[0] // sub_centers, (t_sub, thr, t), dict(K=sub_centers, KP=_slots(sub_centers),
                                                                  HARD=thr is not None)


# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("partialfc::fused_lse_stats", mutates_args=())
def fused_lse_stats(xhat_mm: Tensor, weight: Tensor, inv_norm: Tensor, target: Tensor, logit_t: Tensor,
                    scale: float, sub_centers: int = 1, t_sub: Optional[Tensor] = None, thr: Optional[Tensor] = None,
                    t: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per row over this shard's classes: (max, sum-exp, sum-exp without the target), (B,) each in
    ``inv_norm``'s dtype. An empty shard gives (-inf, 0, 0); an empty batch three (0,). Sub-centers
    and hard negatives (``sub_centers``, ``t_sub``, ``thr``, ``t``): see the module docstring."""
    b, d = xhat_mm.shape
    acc, device = inv_norm.dtype, xhat_mm.device
    c, extra, switches = _switches(weight, b, acc, sub_centers, t_sub, thr, t)
    if c == 0 or b == 0:
        return (torch.full((b,), -math.inf, dtype=acc, device=device), torch.zeros(b, dtype=acc, device=device),
                torch.zeros(b, dtype=acc, device=device))
    from . import triton_kernels as k
    launch = _Launch(device, xhat_mm.dtype, acc, d)
    xhat_mm, weight = _rows(xhat_mm), _rows(weight)
    row_blocks, splits, per = launch.split("forward", b, c, sub_centers)
    parts = torch.empty(3, splits, b, dtype=acc, device=device)  # (max, sum-exp, rest) per split
    bb, bc, _ = launch.tile("forward", sub_centers)
    k.forward_kernel[(row_blocks, splits)](
        xhat_mm, weight, inv_norm.contiguous(), _scale(scale, acc, device), target.contiguous(),
        logit_t.contiguous(), *extra, parts[0], parts[1], parts[2], b, c, d, xhat_mm.stride(0), weight.stride(0),
        per, BLOCK_B=bb, BLOCK_C=bc, **switches, **launch.common())
    m_parts, s_parts, r_parts = parts.unbind(0)  # (splits, B) each
    m_local = m_parts.amax(dim=0)
    rescale = torch.exp(m_parts - m_local)  # (splits, B); 1 with one split
    return m_local, (s_parts * rescale).sum(dim=0), (r_parts * rescale).sum(dim=0)


@fused_lse_stats.register_fake
def _fused_lse_stats_fake(xhat_mm, weight, inv_norm, target, logit_t, scale, sub_centers=1, t_sub=None, thr=None,
                          t=None):
    b = xhat_mm.shape[0]
    return tuple(xhat_mm.new_empty((b,), dtype=inv_norm.dtype) for _ in range(3))


@torch.library.custom_op("partialfc::fused_margin_grads", mutates_args=())
def fused_margin_grads(xhat_mm: Tensor, weight: Tensor, inv_norm: Tensor, scale: float, target: Tensor,
                       logit_t: Tensor, m_global: Tensor, coef: Tensor, t_gain: Tensor, dpsi: Tensor,
                       sub_centers: int = 1, t_sub: Optional[Tensor] = None, thr: Optional[Tensor] = None,
                       t: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(dL/dx^ (B, d) in ``inv_norm``'s dtype, dL/dW (C_local k, d) contiguous in the weight's dtype,
    radial part projected out) from the global row statistics; zeros for an empty batch. With
    sub-centers a logit's gradient goes to the row that won its class (the target's: ``t_sub``)."""
    b, d = xhat_mm.shape
    acc, device = inv_norm.dtype, xhat_mm.device
    c, extra, switches = _switches(weight, b, acc, sub_centers, t_sub, thr, t)
    grad_xhat = torch.zeros(b, d, dtype=acc, device=device)  # (B, d)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)  # (C_local k, d) weight's dtype
    if not (b and c):
        return grad_xhat, grad_w.zero_()
    from . import triton_kernels as k
    launch = _Launch(device, xhat_mm.dtype, acc, d)
    xhat_mm, weight = _rows(xhat_mm), _rows(weight)
    rows = (inv_norm, _scale(scale, acc, device), target, logit_t, m_global, coef, t_gain, dpsi)
    rows = tuple(t.contiguous() for t in rows)
    row_blocks, splits, per = launch.split("grad_x", b, c, sub_centers)
    bb, bc, _ = launch.tile("grad_x", sub_centers)
    k.grad_x_kernel[(row_blocks, splits)](
        xhat_mm, weight, *rows, *extra, grad_xhat, b, c, d, xhat_mm.stride(0), weight.stride(0), grad_xhat.stride(0),
        per, BLOCK_B=bb, BLOCK_C=bc, ATOMIC=splits > 1, **switches, **launch.common())
    bb, bc, _ = launch.tile("grad_w", sub_centers)
    k.grad_w_kernel[(math.ceil(c / bc),)](
        xhat_mm, weight, *rows, *extra, grad_w, b, c, d, xhat_mm.stride(0), weight.stride(0), grad_w.stride(0),
        BLOCK_B=bb, BLOCK_C=bc, **switches, **launch.common())
    return grad_xhat, grad_w


@fused_margin_grads.register_fake
def _fused_margin_grads_fake(xhat_mm, weight, inv_norm, scale, target, logit_t, m_global, coef, t_gain, dpsi,
                             sub_centers=1, t_sub=None, thr=None, t=None):
    return (xhat_mm.new_empty(xhat_mm.shape, dtype=inv_norm.dtype),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is active (the planner's, or a tracer's): the ops then run their
    fake implementations and no kernel, on any device."""
    from torch._guards import detect_fake_mode
    return detect_fake_mode() is not None

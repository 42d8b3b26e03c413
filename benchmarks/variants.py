"""The rows of the benchmark: PartialFC variants, the insightface-style autograd head they are
compared with, and the bare matrix products of the same shapes (the numerator of eta).

    materialized    PartialFC default: one (B, C_local) logits buffer; torch.optim.SGD(momentum)
    chunked         PartialFC(chunk_size=...): logits recomputed per block in backward
    sampled_dense   PartialFC(sample_rate=r); torch.optim.SGD(momentum) on the dense gradient
    sampled_sparse  PartialFC(sample_rate=r, sparse_grad=True); partialfc.optim.SparseSGD(momentum)
    baseline        BaselineHead: autograd all-gather, F.normalize of x and W, full logits,
                    acos/cos over the whole matrix, softmax cross-entropy from torch ops with
                    all-reduces (F.cross_entropy on one rank)
    adaface         PartialFC(margin=AdaFace()): per-row margins from the global batch's norms
    curricularface  PartialFC(margin=CurricularFace()): hard negatives reshaped; one more (B,) all-reduce,
                    logits recomputed in backward
    subcenter       PartialFC(sub_centers=3), ArcFace: 3 rows per class, each class's nearest row
                    (its products have 3 C_local rows: eta is measured against those)
    triton          PartialFC(impl="triton"): fused Triton kernels, no (B, C_local) logits (opt-in;
                    CUDA, or the CPU under TRITON_INTERPRET=1, slow)
    filtered        PartialFC(grad_filter=eps, grad_filter_block=...): materialized, certified gradient
                    filtering (blocks of negligible softmax gradient skipped in backward); SGD(momentum)
                    (opt-in)
    filtered_sparse the same with sparse_grad=True and SparseSGD: only the kept rows move (opt-in)
    filtered_chunked the filter on the chunked head (chunk_size=...): the backward recomputes only the
                    chunks that hold a kept block (opt-in)

With ``target_angle`` (degrees) the embeddings are trained-like: each sits at that angle from its
class's row of the PartialFC heads' initial weights (the baseline head has its own weights).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partialfc import AdaFace, CombinedMargin, CurricularFace, PartialFC, shard_bounds
from partialfc.collectives import all_reduce_, group_rank, group_size, is_distributed
from partialfc.init import BLOCK_ROWS, init_weight_rows_
from partialfc.optim import SparseSGD

from .config import DTYPES, SUB_CENTERS, VARIANTS, BenchConfig

# torch 2.13 renamed the tensor forms of these collectives; the GPU machines run 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherRows(torch.autograd.Function):
    """forward: all-gather rows (equal sizes); backward: reduce-scatter (SUM) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


class _SumOverRanks(torch.autograd.Function):
    """forward: all-reduce SUM. backward: identity (every rank computes the same loss, so the
    gradient w.r.t. this rank's term is the gradient w.r.t. the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class BaselineHead(nn.Module):
    """ArcFace head written the obvious way with autograd (what the PartialFC head is compared to)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, group=None,
                 device=None, dtype=None):
        super().__init__()
        self.s, self.m, self.group = s, m, group
        self.class_start, self.class_end = shard_bounds(num_classes, group_size(group), group_rank(group))
        self.weight = nn.Parameter(torch.empty(self.class_end - self.class_start, embedding_size,
                                               device=device, dtype=dtype))
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01)

    def _gather(self, embeddings, labels):
        """All embeddings (with autograd) and labels of the group; the inputs on one rank."""
        if not is_distributed(self.group):
            return embeddings, labels
        x = _AllGatherRows.apply(embeddings, self.group)
        labels_all = labels.new_empty(dist.get_world_size(self.group) * labels.shape[0])
        _all_gather_single(labels_all, labels.contiguous(), group=self.group)
        return x, labels_all

    def forward(self, embeddings, labels):
        """Mean ArcFace loss over the global batch (every rank returns the same value)."""
        x, labels = self._gather(embeddings, labels)
        cos = F.linear(F.normalize(x), F.normalize(self.weight))  # (B, C_local)
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        one_hot = torch.zeros_like(cos).scatter_(1, local.clamp(0, self.weight.shape[0] - 1).unsqueeze(1),
                                                 mine.unsqueeze(1).to(cos.dtype))
        eps = max(1e-7, 4 * torch.finfo(cos.dtype).eps)
        theta = torch.acos(cos.clamp(-1 + eps, 1 - eps))
        logits = self.s * torch.cos(theta + self.m * one_hot)  # margin on the target entries
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if not is_distributed(self.group):
            return F.cross_entropy(logits, labels)
        row_max = logits.detach().amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        sum_exp = _SumOverRanks.apply(torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1), self.group)
        target = _SumOverRanks.apply((logits * one_hot).sum(dim=1), self.group)
        return (torch.log(sum_exp) + row_max - target).mean()


def build_head(variant: str, cfg: BenchConfig, device, group=None) -> nn.Module:
    """The head of one variant, on ``cfg``'s shapes (ArcFace s = 64, m = 0.5)."""
    dtype = DTYPES[cfg.dtype]
    d, n = cfg.embedding_size, cfg.num_classes
    if variant == "baseline":
        return BaselineHead(d, n, group=group, device=device, dtype=dtype)
    filt = True if cfg.grad_filter is None else cfg.grad_filter
    options = {"materialized": {}, "chunked": dict(chunk_size=cfg.chunk_size),
               "sampled_dense": dict(sample_rate=cfg.sample_rate),
               "sampled_sparse": dict(sample_rate=cfg.sample_rate, sparse_grad=True),
               "adaface": dict(margin=AdaFace(s=64.0, m=0.4)),
               "curricularface": dict(margin=CurricularFace(s=64.0, m=0.5)),
               "subcenter": dict(sub_centers=SUB_CENTERS),
               "triton": dict(impl="triton"),
               "filtered": dict(grad_filter=filt, grad_filter_block=cfg.grad_filter_block),
               "filtered_sparse": dict(grad_filter=filt, grad_filter_block=cfg.grad_filter_block, sparse_grad=True),
               "filtered_chunked": dict(grad_filter=filt, grad_filter_block=cfg.grad_filter_block,
                                        chunk_size=cfg.chunk_size),
               }[variant]
    options.setdefault("margin", CombinedMargin.arcface(s=64.0, m=0.5))
    return PartialFC(d, n, group=group, validate=cfg.validate, uniform_batch=True, seed=cfg.seed, device=device,
                     dtype=dtype, **options)


def build_optimizer(variant: str, head: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
    """SparseSGD for the sparse-row variant, torch.optim.SGD (momentum) for every other."""
    cls = SparseSGD if variant in ("sampled_sparse", "filtered_sparse") else torch.optim.SGD
    return cls(head.parameters(), lr=cfg.lr, momentum=cfg.momentum)


class Case:
    """One variant on this rank: head, optimizer, inputs, and the timings taken so far."""

    def __init__(self, variant: str, cfg: BenchConfig, device: torch.device, group=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
        self.variant, self.cfg, self.device = variant, cfg, device
        self.head = build_head(variant, cfg, device, group)
        self.opt = build_optimizer(variant, self.head, cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + group_rank(group) + 1)
        dtype = DTYPES[cfg.dtype]
        self.embeddings = torch.randn(cfg.batch_per_rank, cfg.embedding_size, generator=g).to(device, dtype)
        self.labels = torch.randint(0, cfg.num_classes, (cfg.batch_per_rank,), generator=g).to(device)
        if cfg.target_angle is not None:
            k = SUB_CENTERS if variant == "subcenter" else 1
            self.embeddings = trained_like(self.labels.cpu() * k, cfg.num_classes * k, cfg, g).to(device, dtype)
        self.embeddings.requires_grad_(True)
        self.autocast = DTYPES[cfg.amp] if cfg.amp != "none" else None
        self.times = {"fb": [], "step": [], "mm": []}
        self.rows = None  # classes per matrix product (sampled rows for sampled variants)
        self.coll = None  # (bytes sent, calls, detail) of one full step
        self.cuda_mem = {}

    def fwd_bwd(self):
        """zero_grad, forward (under autocast when asked), backward; returns the loss."""
        self.opt.zero_grad(set_to_none=True)
        self.embeddings.grad = None
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.head(self.embeddings, self.labels)
        loss.backward()
        return loss

    def step(self):
        """A full training step of the head: forward, backward, optimizer step."""
        self.fwd_bwd()
        self.opt.step()

    def matmul_rows(self) -> int:
        """Classes in this variant's products: the sampled rows (after a step) or C_local."""
        if self.rows is None:
            idx = getattr(self.head, "sampled_index", None)
            self.rows = int(idx.numel()) if (self.variant.startswith("sampled") and idx is not None) \
                else self.head.weight.shape[0]
        return self.rows


def initial_rows(rows: torch.Tensor, num_rows: int, cfg: BenchConfig) -> torch.Tensor:
    """The heads' initial weight rows of global row ids ``rows`` (n,): (n, d), float32 on the CPU."""
    out = torch.empty(rows.shape[0], cfg.embedding_size)
    for block in rows.div(BLOCK_ROWS, rounding_mode="floor").unique().tolist():
        b0 = block * BLOCK_ROWS
        values = init_weight_rows_(torch.empty(min(BLOCK_ROWS, num_rows - b0), cfg.embedding_size), b0, cfg.seed)
        mine = (rows >= b0) & (rows < b0 + BLOCK_ROWS)
        out[mine] = values[rows[mine] - b0]
    return out


def trained_like(rows: torch.Tensor, num_rows: int, cfg: BenchConfig, generator) -> torch.Tensor:
    """Embeddings (n, d) at ``cfg.target_angle`` degrees from the initial weight rows ``rows`` (a random
    direction orthogonal to the row), of norm sqrt(d) like the random ones."""
    w = F.normalize(initial_rows(rows, num_rows, cfg), dim=1)
    u = torch.randn(w.shape, generator=generator)
    u = F.normalize(u - (u * w).sum(1, keepdim=True) * w, dim=1)
    theta = torch.tensor(float(cfg.target_angle)).deg2rad()
    return (torch.cos(theta) * w + torch.sin(theta) * u) * cfg.embedding_size ** 0.5


def filter_accuracy(case: Case, float64: bool = False) -> dict:
    """What the filtered variants drop, on the case's inputs: the exact and the filtered gradient of the
    same head, side by side (every rank calls it; a few all-reduces). Relative to the exact gradient's
    norm over all ranks: ``w_err``/``x_err`` the true error, ``w_bound``/``x_bound`` the reported bound.
    ``float64``: also both heads' error against the float64 head (``*_err64``: exact, ``*_ferr64``: filtered)."""
    head, x = case.head, case.embeddings

    def grads(return_stats, h=head, xx=x):
        h.weight.grad, xx.grad = None, None
        out = h(xx, case.labels, return_stats=return_stats)
        (out[0] if return_stats else out).backward()
        gw = h.weight.grad
        return (gw.to_dense() if gw.is_sparse else gw).double(), xx.grad.double()

    eps, head.grad_filter = head.grad_filter, None
    gw0, gx0 = grads(False)
    extra = {}
    if float64:
        ref = copy.deepcopy(head).double()
        gw64, gx64 = grads(False, ref, x.detach().double().requires_grad_())
        del ref
        e = torch.stack([(gw0 - gw64).square().sum(), gw64.square().sum(), (gx0 - gx64).square().sum(),
                         gx64.square().sum()])
    head.grad_filter = eps
    gw1, gx1 = grads(True)
    head.weight.grad, x.grad = None, None
    if float64:
        e = torch.cat([e, torch.stack([(gw1 - gw64).square().sum(), (gx1 - gx64).square().sum()])])
        all_reduce_(e, "sum")
        extra = dict(w_err64=float((e[0] / e[1]).sqrt()), x_err64=float((e[2] / e[3]).sqrt()),
                     w_ferr64=float((e[4] / e[1]).sqrt()), x_ferr64=float((e[5] / e[3]).sqrt()))
    fs = head.last_filter_stats
    b = fs.global_bounds()
    sums = torch.stack([(gw1 - gw0).square().sum(), gw0.square().sum(), (gx1 - gx0).square().sum(),
                        gx0.square().sum(), b.embedding_bound.double().square()])
    all_reduce_(sums, "sum")
    w_norm, x_norm = float(sums[1].sqrt()), float(sums[3].sqrt())
    return dict(skipped=b.skipped_fraction, eps=fs.eps, w_err=float(sums[0].sqrt()) / w_norm,
                w_bound=float(b.weight_bound) / w_norm, x_err=float(sums[2].sqrt()) / x_norm,
                x_bound=float(sums[4].sqrt()) / x_norm, row_mass=float(b.row_mass.max()) if b.row_mass.numel() else 0.0,
                **extra)


def matmul_tensors(cache: dict, rows: int, cfg: BenchConfig, device) -> tuple:
    """x (B, d), W (rows, d), G (B, rows) in the matmul dtype, made once per (rows, dtype)."""
    key = (rows, cfg.mm_dtype)
    if key not in cache:
        g = torch.Generator().manual_seed(7)
        dt = DTYPES[cfg.mm_dtype]
        b, d = cfg.global_batch, cfg.embedding_size
        cache[key] = tuple(t.to(device=device, dtype=dt) for t in (
            torch.randn(b, d, generator=g), torch.randn(rows, d, generator=g) * 0.01,
            torch.randn(b, rows, generator=g) * 1e-3))
    return cache[key]


def matmuls(x, w, grad):
    """The three products of a head's step: x W^T, G W, G^T x."""
    torch.mm(x, w.t())  # logits (B, C)
    torch.mm(grad, w)  # embedding gradient (B, d)
    torch.mm(grad.t(), x)  # weight gradient (C, d)

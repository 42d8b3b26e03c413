"""Benchmark of the PartialFC head: step time, matmul efficiency, memory, collective traffic.

    python -m launch.bench                          # target configuration, 2 gloo ranks on CPU
    python -m launch.bench --quick --out runs/bq    # tiny shapes, < 1 minute (used by the tests)
    python -m launch.bench --sweep 25000,50000,100000 --out runs/bench
    torchrun --nproc-per-node 8 -m launch.bench --classes-per-rank 1000000 --batch-per-rank 128 \\
        --dtype bf16 --variants materialized,chunked,sampled_sparse     # several GPUs

Where it runs:
  * CPU (default without CUDA): ``--world-size`` ranks (default 2) started with
    torch.multiprocessing and joined in a gloo group through a FileStore, ``--threads`` (default 1)
    intra-op threads each.
  * one GPU: world 1, no process group.
  * several GPUs: under ``torchrun`` (``LOCAL_RANK``/``WORLD_SIZE`` set) on the NCCL group it
    initialises (or the one that already exists).

Variants (the rows of the table):
  materialized    PartialFC default: one (B, C_local) logits buffer; torch.optim.SGD(momentum)
  chunked         PartialFC(chunk_size=--chunk-size): logits recomputed per block in backward
  sampled_dense   PartialFC(sample_rate=r); torch.optim.SGD(momentum) on the dense gradient
  sampled_sparse  PartialFC(sample_rate=r, sparse_grad=True); partialfc.optim.SparseSGD(momentum)
  baseline        a plain autograd head written here: autograd all-gather, F.normalize of x and W,
                  full logits, acos/cos over the whole matrix, softmax cross-entropy from torch ops
                  with all-reduces (F.cross_entropy on one rank)

For each one: median over --repeats of forward+backward and of forward+backward+optimizer step
(after --warmup steps; barrier before and, on CUDA, synchronize around each timing; per repeat
the slowest rank counts), and, timed in the same rounds, the three bare matrix products of the
same shapes (x W^T: (B, d)(d, C); G W: (B, C)(C, d); G^T x: (C, B)(B, d), C = the sampled rows
for sampled variants). Variants are timed round-robin (one repeat of each in turn), so a change
of machine load hits them alike. eta = matmul time / forward+backward time, the median over
rounds of the per-round ratio; GFLOP/s = 6 B C d / median fwd+bwd. Step-time ratios between
variants in the targets are medians of per-round ratios as well.

Memory: on CUDA ``max_memory_allocated`` during the steps minus the allocation after the
variant was built and warmed up; on CPU each (configuration, variant) runs in a fresh group of
processes and reports its peak resident set size (VmHWM, i.e. ``getrusage().ru_maxrss`` without
the marks left by exited threads; ``ru_maxrss`` where /proc is missing), the high-water mark
reset through /proc/self/clear_refs at the baseline, minus the RSS after the weights were
allocated and one warm-up forward+backward: "memory above the weights", max over ranks. It is
measured twice, after --memory-steps forward+backward steps (``mem_fb``) and after as many full
steps with the optimizer (``mem_step``, includes the optimizer state), and set beside the
prediction of :mod:`partialfc.plan` (``pred_fb``, ``pred_step``).

Collective bytes: the torch.distributed calls made during one full step are recorded (wrapping
``dist.all_reduce`` / ``all_gather_single`` / ``reduce_scatter_single`` and the aliases in
``partialfc.collectives``); ``coll_bytes`` is what one rank sends under ring algorithms
(all-gather (W-1)*in, reduce-scatter (W-1)*out, all-reduce 2(W-1)/W*n), ``coll_detail`` the
payload of each call.

Outputs in --out: bench.md, bench.csv, bench.json and bench.png (fwd+bwd time and memory above
the weights against the classes per rank).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import partialfc.collectives as pfc_collectives
from partialfc import CombinedMargin, PartialFC, shard_bounds
from partialfc.optim import SparseSGD
from partialfc.plan import plan_memory

VARIANTS = ("materialized", "chunked", "sampled_dense", "sampled_sparse", "baseline")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MiB = 2 ** 20

# the targets of the benchmark issue (CPU, 2 ranks x 1 thread, B_r 256, d 512, C_local 100k, fp32)
TARGETS = dict(materialized_eta=0.80, chunked_eta=0.65, chunked_memory_ratio=0.15, sparse_step_ratio=0.20)


@dataclass
class BenchConfig:
    classes_per_rank: int = 100_000
    embedding_size: int = 512
    batch_per_rank: int = 256
    sample_rate: float = 0.1
    chunk_size: int = 8192
    dtype: str = "fp32"
    amp: str = "none"  # autocast dtype for the head's forward ("none", "bf16", "fp16")
    world_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    validate: bool = False
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.classes_per_rank * self.world_size

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    @property
    def mm_dtype(self) -> str:
        return self.dtype if self.amp == "none" else self.amp


# ------------------------------------------------------------------------------------------
# the straightforward autograd head
def _dist_on(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGatherRows(torch.autograd.Function):
    """forward: all-gather rows (equal sizes); backward: reduce-scatter (SUM) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
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
        world = dist.get_world_size(group) if _dist_on(group) else 1
        rank = dist.get_rank(group) if _dist_on(group) else 0
        self.class_start, self.class_end = shard_bounds(num_classes, world, rank)
        self.weight = nn.Parameter(torch.empty(self.class_end - self.class_start, embedding_size,
                                               device=device, dtype=dtype))
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01)

    def forward(self, embeddings, labels):
        distributed = _dist_on(self.group)
        if distributed:
            x = _AllGatherRows.apply(embeddings, self.group)
            labels_all = labels.new_empty(dist.get_world_size(self.group) * labels.shape[0])
            dist.all_gather_single(labels_all, labels.contiguous(), group=self.group)
            labels = labels_all
        else:
            x = embeddings
        cos = F.linear(F.normalize(x), F.normalize(self.weight))  # (B, C_local)
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        one_hot = torch.zeros_like(cos).scatter_(1, local.clamp(0, self.weight.shape[0] - 1).unsqueeze(1),
                                                 mine.unsqueeze(1).to(cos.dtype))
        eps = max(1e-7, 4 * torch.finfo(cos.dtype).eps)
        theta = torch.acos(cos.clamp(-1 + eps, 1 - eps))
        logits = self.s * torch.cos(theta + self.m * one_hot)  # margin on the target entries
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if not distributed:
            return F.cross_entropy(logits, labels)
        row_max = logits.detach().amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        sum_exp = _SumOverRanks.apply(torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1), self.group)
        target = _SumOverRanks.apply((logits * one_hot).sum(dim=1), self.group)
        return (torch.log(sum_exp) + row_max - target).mean()


# ------------------------------------------------------------------------------------------
# collective accounting
class CollectiveCounter:
    """Records the torch.distributed calls made inside the ``with`` block (sizes only)."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.calls: list[tuple[str, int, int]] = []  # (kind, input bytes, output bytes)
        self._saved = []

    def _wrap(self, owner, attr, kind):
        original = getattr(owner, attr, None)
        if original is None:
            return
        counter = self

        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if kind == "all_reduce":
                counter.calls.append((kind, _nbytes(tensors[0]), _nbytes(tensors[0])))
            else:  # (output, input, ...)
                counter.calls.append((kind, _nbytes(tensors[1]), _nbytes(tensors[0])))
            return original(*args, **kwargs)

        self._saved.append((owner, attr, original))
        setattr(owner, attr, wrapped)

    def __enter__(self):
        self.calls = []
        self._wrap(pfc_collectives, "_all_gather_tensor", "all_gather")
        self._wrap(pfc_collectives, "_reduce_scatter_tensor", "reduce_scatter")
        self._wrap(dist, "all_gather_single", "all_gather")
        self._wrap(dist, "reduce_scatter_single", "reduce_scatter")
        self._wrap(dist, "all_gather_into_tensor", "all_gather")
        self._wrap(dist, "reduce_scatter_tensor", "reduce_scatter")
        self._wrap(dist, "all_reduce", "all_reduce")
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved = []
        return False

    def sent_bytes(self) -> int:
        """Bytes one rank sends under ring algorithms."""
        w, total = self.world, 0.0
        for kind, nin, nout in self.calls:
            if kind == "all_gather":
                total += (w - 1) * nin
            elif kind == "reduce_scatter":
                total += (w - 1) * nout
            else:
                total += 2 * (w - 1) / w * nin
        return int(round(total))

    def detail(self) -> str:
        return " ".join(f"{kind}:{nin if kind != 'reduce_scatter' else nout}" for kind, nin, nout in self.calls)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------
# one variant: head, optimizer, inputs, timings
class Case:
    def __init__(self, variant: str, cfg: BenchConfig, device: torch.device, group=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
        self.variant, self.cfg, self.device = variant, cfg, device
        dtype = DTYPES[cfg.dtype]
        d, n = cfg.embedding_size, cfg.num_classes
        common = dict(margin=CombinedMargin.arcface(s=64.0, m=0.5), group=group, validate=cfg.validate,
                      uniform_batch=True, seed=cfg.seed, device=device, dtype=dtype)
        if variant == "materialized":
            self.head = PartialFC(d, n, **common)
        elif variant == "chunked":
            self.head = PartialFC(d, n, chunk_size=cfg.chunk_size, **common)
        elif variant == "sampled_dense":
            self.head = PartialFC(d, n, sample_rate=cfg.sample_rate, **common)
        elif variant == "sampled_sparse":
            self.head = PartialFC(d, n, sample_rate=cfg.sample_rate, sparse_grad=True, **common)
        else:
            self.head = BaselineHead(d, n, group=group, device=device, dtype=dtype)
        if variant == "sampled_sparse":
            self.opt = SparseSGD(self.head.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        else:
            self.opt = torch.optim.SGD(self.head.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        rank = dist.get_rank(group) if _dist_on(group) else 0
        g = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
        self.embeddings = torch.randn(cfg.batch_per_rank, d, generator=g).to(device=device, dtype=dtype)
        self.embeddings.requires_grad_(True)
        self.labels = torch.randint(0, n, (cfg.batch_per_rank,), generator=g).to(device)
        self.autocast = DTYPES[cfg.amp] if cfg.amp != "none" else None
        self.times = {"fb": [], "step": [], "mm": []}
        self.rows = None  # classes per matrix product (sampled rows for sampled variants)

    def fwd_bwd(self):
        self.opt.zero_grad(set_to_none=True)
        self.embeddings.grad = None
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.head(self.embeddings, self.labels)
        loss.backward()
        return loss

    def step(self):
        self.fwd_bwd()
        self.opt.step()

    def matmul_rows(self) -> int:
        if self.rows is None:
            idx = getattr(self.head, "sampled_index", None)
            self.rows = int(idx.numel()) if (self.variant.startswith("sampled") and idx is not None) \
                else self.head.weight.shape[0]
        return self.rows


def _matmul_tensors(cache: dict, rows: int, cfg: BenchConfig, device) -> tuple:
    key = (rows, cfg.mm_dtype)
    if key not in cache:
        g = torch.Generator().manual_seed(7)
        dt = DTYPES[cfg.mm_dtype]
        b, d = cfg.global_batch, cfg.embedding_size
        cache[key] = tuple(t.to(device=device, dtype=dt) for t in (
            torch.randn(b, d, generator=g), torch.randn(rows, d, generator=g) * 0.01,
            torch.randn(b, rows, generator=g) * 1e-3))
    return cache[key]


def _matmuls(x, w, grad):
    torch.mm(x, w.t())  # logits (B, C)
    torch.mm(grad, w)  # embedding gradient (B, d)
    torch.mm(grad.t(), x)  # weight gradient (C, d)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device, group=None):
    if _dist_on(group):
        t = torch.zeros(1, device=device)
        dist.all_reduce(t, group=group)
    _sync(device)


def _timed(fn, device, group=None) -> float:
    _barrier(device, group)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def time_variants(cfg: BenchConfig, variants, warmup: int, repeats: int, device, group=None,
                  interleave: bool = True, cuda_memory: bool = False, memory_steps: int = 2) -> list[dict]:
    """Time the variants on this rank (every rank of ``group`` must call it alike).

    ``interleave``: build every variant first and time them round-robin, so that load changes
    hit them alike; otherwise one after the other, freeing each before the next (large GPU runs).
    Returns one row per variant, timings as the median over repeats of the slowest rank.
    """
    world = dist.get_world_size(group) if _dist_on(group) else 1
    rows, mm_cache = [], {}

    def prepare(case):
        for _ in range(warmup):
            case.step()
        x, w, g = _matmul_tensors(mm_cache, case.matmul_rows(), cfg, device)
        for _ in range(max(1, warmup)):
            _matmuls(x, w, g)
        _sync(device)
        with CollectiveCounter(world) as counter:
            case.step()
        _sync(device)
        case.coll = (counter.sent_bytes(), len(counter.calls), counter.detail())

    def one_round(case):
        x, w, g = _matmul_tensors(mm_cache, case.matmul_rows(), cfg, device)
        case.times["fb"].append(_timed(case.fwd_bwd, device, group))
        case.times["step"].append(_timed(case.step, device, group))
        case.times["mm"].append(_timed(lambda: _matmuls(x, w, g), device, group))

    def finish(case):
        t = torch.tensor([case.times["fb"], case.times["step"], case.times["mm"]], dtype=torch.float64)
        if _dist_on(group):  # the slowest rank of each repeat
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            t = t.cpu()
        fb_all, st_all, mm_all = (t[i].tolist() for i in range(3))
        fb, st, mm = _median(fb_all), _median(st_all), _median(mm_all)
        eta = _median([m / f for m, f in zip(mm_all, fb_all)])  # per round: matmuls and step side by side
        c, b, d = case.matmul_rows(), cfg.global_batch, cfg.embedding_size
        row = dict(variant=case.variant, classes_per_rank=cfg.classes_per_rank, rows=c, global_batch=b,
                   embedding_size=d, dtype=cfg.dtype, amp=cfg.amp, world_size=world, sample_rate=cfg.sample_rate
                   if case.variant.startswith("sampled") else 1.0,
                   chunk_size=cfg.chunk_size if case.variant == "chunked" else None,
                   t_fb=fb, t_step=st, t_mm=mm, eta=eta, gflops=6.0 * b * c * d / fb / 1e9,
                   t_fb_all=fb_all, t_step_all=st_all, t_mm_all=mm_all,
                   weights=sum(_nbytes(p) for p in case.head.parameters()),
                   coll_bytes=case.coll[0], coll_calls=case.coll[1], coll_detail=case.coll[2],
                   repeats=len(case.times["fb"]))
        row.update(getattr(case, "cuda_mem", {}))
        rows.append(row)

    def cuda_measure(case):
        case.fwd_bwd()  # warm-up: cuBLAS workspace, kernels; its gradient is dropped again
        case.opt.zero_grad(set_to_none=True)
        case.embeddings.grad = None
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        res = {}
        for key, fn in (("mem_fb", case.fwd_bwd), ("mem_step", case.step)):
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(memory_steps):
                fn()
            torch.cuda.synchronize(device)
            res[key] = torch.cuda.max_memory_allocated(device) - base
        case.opt.zero_grad(set_to_none=True)
        res["mem_base"] = base
        case.cuda_mem = res

    if interleave:
        cases = [Case(v, cfg, device, group) for v in variants]
        for case in cases:
            prepare(case)
        for _ in range(repeats):
            for case in cases:
                one_round(case)
        for case in cases:
            finish(case)
        del cases
    else:
        oom = getattr(torch, "OutOfMemoryError", RuntimeError)
        for v in variants:
            case = None
            try:
                case = Case(v, cfg, device, group)
                if cuda_memory:
                    cuda_measure(case)
                prepare(case)
                for _ in range(repeats):
                    one_round(case)
                finish(case)
            except oom:  # e.g. the baseline head at millions of classes: skip the variant, keep the run
                if device.type != "cuda":
                    raise
                print(f"[bench] {v} at C_local={cfg.classes_per_rank:,}: out of memory, skipped", flush=True)
            del case
            mm_cache.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# CPU memory: resident set size in a fresh process group
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is all we have
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM (Linux), else ``getrusage(RUSAGE_SELF).ru_maxrss``.

    Both are the same high-water mark, except that ru_maxrss also keeps the mark recorded when a
    thread of the process exits, which clearing the mark (``_reset_peak_rss``) does not undo."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_parts() -> dict:
    """Current anonymous / file-backed / shared resident memory (bytes) from /proc/self/status."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pin_malloc_threshold(nbytes: int = MiB) -> bool:
    """Fix glibc's mmap threshold (no dynamic growth up to 32 MiB): buffers >= ``nbytes`` are mapped
    and go back to the OS when freed, so the RSS follows what is allocated instead of keeping
    freed heap blocks resident. False where this is not glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_worker(rank: int, world: int, cfg: BenchConfig, variant: str, steps: int,
                  pin_malloc: bool = True) -> dict:
    """Run in a fresh process: RSS above the weights after fwd+bwd steps, then after full steps.

    One forward+backward of the same head runs before the baseline is read (its gradient is
    then dropped), so that one-time library state (kernels, oneDNN primitives and scratch for
    these shapes, autograd engine, gloo buffers: 5-15 MB) is not counted as the head's."""
    pinned = _pin_malloc_threshold() if pin_malloc else False
    case = Case(variant, cfg, torch.device("cpu"), None)
    case.fwd_bwd()
    case.opt.zero_grad(set_to_none=True)
    case.embeddings.grad = None
    gc.collect()
    base = _rss_bytes()
    reset = _reset_peak_rss()
    slack = _peak_rss_bytes() - base  # > 0 when the reset failed: earlier peaks hide small ones
    parts_base = _rss_parts()
    for _ in range(steps):
        case.fwd_bwd()
    mem_fb = _peak_rss_bytes() - base
    for _ in range(steps):
        case.step()
    mem_step = _peak_rss_bytes() - base
    parts_end = _rss_parts()
    weights = sum(_nbytes(p) for p in case.head.parameters())
    return dict(mem_fb=mem_fb, mem_step=mem_step, mem_base=base, weights=weights, peak_reset=reset,
                reset_slack=slack, malloc_pinned=pinned,
                rss_file_growth=parts_end.get("RssFile", 0) - parts_base.get("RssFile", 0),
                rss_parts_base=parts_base, rss_parts_end=parts_end)


def timing_worker(rank: int, world: int, cfg: BenchConfig, variants, warmup: int, repeats: int,
                  interleave: bool = True):
    return time_variants(cfg, variants, warmup, repeats, torch.device("cpu"), None, interleave=interleave)


def _group_entry(rank, world, store_path, threads, fn, args, results):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        if world > 1:
            store = dist.FileStore(store_path, world)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=300))
        try:
            value = fn(rank, world, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


_PRELOADED = False


def run_group(fn, world: int, *args, threads: int = 1, timeout: float = 1800.0, start_method: str = "forkserver"):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh CPU processes (a gloo group when world > 1)."""
    import torch.multiprocessing as mp
    global _PRELOADED
    if start_method not in mp.get_all_start_methods():
        start_method = "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver" and not _PRELOADED:
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.optim", "partialfc", "partialfc.plan"])  # torch.optim imports _dynamo lazily: 2-3 s
        _PRELOADED = True
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_group_entry, args=(r, world, store, threads, fn, args, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        out, errors = {}, []
        deadline = time.monotonic() + timeout
        try:
            while len(out) + len(errors) < world:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench group timed out after {timeout:.0f}s")
                try:
                    rank, status, value = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"bench rank(s) {dead} died (exit codes "
                                           f"{[procs[r].exitcode for r in dead]})") from None
                    continue
                if status == "ok":
                    out[rank] = value
                else:
                    errors.append(f"--- rank {rank} ---\n{value}")
                    break
        finally:
            for p in procs:
                p.join(timeout=10 if not errors else 1)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if errors:
            raise RuntimeError("bench group failed:\n" + "\n".join(errors))
        return [out[r] for r in range(world)]


def measure_memory_cpu(cfg: BenchConfig, variant: str, steps: int = 2, start_method: str = "forkserver",
                       pin_malloc: bool = True) -> dict:
    """``memory_worker`` in a fresh group of ``cfg.world_size`` processes; max over ranks."""
    from launch import bench as this
    per_rank = run_group(this.memory_worker, cfg.world_size, cfg, variant, steps, pin_malloc,
                         start_method=start_method)
    res = dict(per_rank[0])
    for key in ("mem_fb", "mem_step", "reset_slack"):
        res[key] = max(r[key] for r in per_rank)
    res["peak_reset"] = all(r["peak_reset"] for r in per_rank)
    return res


def predict(cfg: BenchConfig, variant: str, device: str) -> Optional[dict]:
    """The planner's prediction for a variant (None for the baseline head)."""
    if variant == "baseline":
        return None
    optimizer = "sparse_sgd" if variant == "sampled_sparse" else "sgd_momentum"
    return plan_memory(classes_per_rank=cfg.classes_per_rank, embedding_size=cfg.embedding_size,
                       world_size=cfg.world_size, batch_per_rank=cfg.batch_per_rank,
                       sample_rate=cfg.sample_rate if variant.startswith("sampled") else 1.0,
                       dtype=cfg.dtype, mm_dtype=cfg.mm_dtype, embedding_dtype=cfg.dtype, optimizer=optimizer,
                       chunk_size=cfg.chunk_size if variant == "chunked" else None,
                       sparse_grad=variant == "sampled_sparse", device=device)


# ------------------------------------------------------------------------------------------
# report
def machine_info(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), cores=os.cpu_count(),
                cpu=platform.processor() or platform.machine())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count()
    return info


def _mib(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / MiB:.1f}"


def _fmt_err(pred, meas) -> str:
    if pred is None or meas is None or meas <= 0:
        return ""
    return f"{100.0 * (pred - meas) / meas:+.1f}%"


def _round_ratio(a: dict, b: dict, key: str) -> float:
    """Median over rounds of a[key] / b[key] when both were timed in the same rounds, else the
    ratio of the medians."""
    xs, ys = a.get(key + "_all"), b.get(key + "_all")
    if xs and ys and len(xs) == len(ys):
        return _median([x / y for x, y in zip(xs, ys)])
    return a[key] / b[key]


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Checks of the issue's targets for every class count in ``rows``."""
    checks = []
    by_c: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_c.setdefault(r["classes_per_rank"], {})[r["variant"]] = r
    for c, v in sorted(by_c.items()):
        if "materialized" in v:
            checks.append(dict(C=c, name="materialized eta (fwd+bwd)", value=v["materialized"]["eta"],
                               target=f">= {TARGETS['materialized_eta']}",
                               met=v["materialized"]["eta"] >= TARGETS["materialized_eta"]))
        if "chunked" in v:
            checks.append(dict(C=c, name="chunked eta (fwd+bwd)", value=v["chunked"]["eta"],
                               target=f">= {TARGETS['chunked_eta']}", met=v["chunked"]["eta"] >= TARGETS["chunked_eta"]))
        if "chunked" in v and "materialized" in v and v["materialized"].get("mem_fb"):
            ratio = v["chunked"]["mem_fb"] / v["materialized"]["mem_fb"]
            checks.append(dict(C=c, name="chunked / materialized memory above the weights (fwd+bwd)",
                               value=ratio, target=f"<= {TARGETS['chunked_memory_ratio']}",
                               met=ratio <= TARGETS["chunked_memory_ratio"]))
        if "sampled_sparse" in v and "materialized" in v:
            ratio = _round_ratio(v["sampled_sparse"], v["materialized"], "t_step")
            checks.append(dict(C=c, name="sampled_sparse step / materialized step (incl. optimizer)",
                               value=ratio, target=f"<= {TARGETS['sparse_step_ratio']}",
                               met=ratio <= TARGETS["sparse_step_ratio"]))
    cs = sorted(by_c)
    if len(cs) > 1:
        for variant in VARIANTS:
            vals = {c: by_c[c][variant]["coll_bytes"] for c in cs if variant in by_c[c]}
            if len(vals) > 1:
                checks.append(dict(C=",".join(map(str, vals)), name=f"{variant}: collective bytes independent of C",
                                   value=" / ".join(str(b) for b in vals.values()), target="all equal",
                                   met=len(set(vals.values())) == 1))
    return checks


COLUMNS = ["classes_per_rank", "variant", "rows", "t_fb", "t_step", "t_mm", "eta", "gflops", "mem_fb", "pred_fb",
           "mem_step", "pred_step", "coll_bytes", "coll_calls"]


def markdown_table(rows: list[dict]) -> str:
    head = ("| C_local | variant | C in matmul | fwd+bwd ms | step ms | matmul ms | η | GFLOP/s | "
            "mem fwd+bwd MiB | pred MiB | err | mem step MiB | pred MiB | err | coll bytes/step | calls |")
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for r in rows:
        lines.append(
            f"| {r['classes_per_rank']:,} | {r['variant']} | {r['rows']:,} | {1e3 * r['t_fb']:.1f} | "
            f"{1e3 * r['t_step']:.1f} | {1e3 * r['t_mm']:.1f} | {r['eta']:.3f} | {r['gflops']:.1f} | "
            f"{_mib(r.get('mem_fb'))} | {_mib(r.get('pred_fb'))} | {_fmt_err(r.get('pred_fb'), r.get('mem_fb'))} | "
            f"{_mib(r.get('mem_step'))} | {_mib(r.get('pred_step'))} | "
            f"{_fmt_err(r.get('pred_step'), r.get('mem_step'))} | {r['coll_bytes']:,} | {r['coll_calls']} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], out_dir: str, meta: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"bench.{k}") for k in ("md", "csv", "json", "png")}
    fields = ["classes_per_rank", "variant", "rows", "global_batch", "embedding_size", "dtype", "amp",
              "world_size", "sample_rate", "chunk_size", "t_fb", "t_step", "t_mm", "eta", "gflops", "mem_fb",
              "mem_step", "pred_fb", "pred_step", "mem_base", "weights", "coll_bytes", "coll_calls",
              "coll_detail", "repeats"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    checks = evaluate_targets(rows)
    with open(paths["json"], "w") as f:
        json.dump(dict(meta=meta, rows=rows, targets=checks), f, indent=2, default=str)
    md = [f"# PartialFC head benchmark", "",
          f"`{meta['command']}`", "",
          f"- machine: {meta['machine'].get('cpu')} ({meta['machine'].get('cores')} cores)"
          + (f", GPU {meta['machine']['gpu']}" if "gpu" in meta["machine"] else "")
          + f", torch {meta['machine']['torch']}, Python {meta['machine']['python']}",
          f"- {meta['where']}",
          f"- d = {meta['config']['embedding_size']}, batch per rank {meta['config']['batch_per_rank']}, "
          f"dtype {meta['config']['dtype']}" + (f" (autocast {meta['config']['amp']})" if meta['config']['amp'] != "none" else "")
          + f", sample rate {meta['config']['sample_rate']}, chunk {meta['config']['chunk_size']}, "
          f"warm-up {meta['warmup']}, median of {meta['repeats']} repeats (slowest rank per repeat)",
          f"- memory: {meta['memory_note']}",
          "- η = (x·Wᵀ + G·W + Gᵀ·x matmul time) / (forward+backward time); GFLOP/s = 6·B·C·d / fwd+bwd; "
          "coll bytes = bytes one rank sends per full step (ring model)", "",
          markdown_table(rows), ""]
    if checks:
        md += ["## Targets", "", "| C_local | check | value | target | met |", "|---|---|---|---|---|"]
        for c in checks:
            value = f"{c['value']:.3f}" if isinstance(c["value"], float) else str(c["value"])
            md.append(f"| {c['C']} | {c['name']} | {value} | {c['target']} | {'yes' if c['met'] else 'NO'} |")
        md.append("")
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    try:
        plot(rows, paths["png"])
    except ImportError:
        paths.pop("png")
    return paths


def plot(rows: list[dict], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in VARIANTS:
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["classes_per_rank"])
        if not rs:
            continue
        xs = [r["classes_per_rank"] for r in rs]
        line, = ax1.plot(xs, [1e3 * r["t_fb"] for r in rs], "o-", label=f"{variant} fwd+bwd")
        ax1.plot(xs, [1e3 * r["t_step"] for r in rs], "x--", color=line.get_color(), alpha=0.6)
        mem = [(r["classes_per_rank"], r.get("mem_step")) for r in rs if r.get("mem_step") is not None]
        if mem:
            ax2.plot([m[0] for m in mem], [m[1] / MiB for m in mem], "o-", color=line.get_color(), label=variant)
        pred = [(r["classes_per_rank"], r.get("pred_step")) for r in rs if r.get("pred_step") is not None]
        if pred:
            ax2.plot([p[0] for p in pred], [p[1] / MiB for p in pred], ":", color=line.get_color())
    ax1.set(xlabel="classes per rank", ylabel="ms (solid fwd+bwd, dashed + optimizer)", title="step time")
    ax2.set(xlabel="classes per rank", ylabel="MiB", title="memory above the weights, full step (dotted: plan)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
def _parse_list(text: str, cast=int) -> list:
    return [cast(x) for x in str(text).replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--classes-per-rank", "-c", type=int, default=100_000, help="C_local (default 100000)")
    p.add_argument("--sweep", type=str, default=None,
                   help="comma-separated C_local values to run (replaces --classes-per-rank), e.g. 25000,50000,100000")
    p.add_argument("--embedding-size", "-d", type=int, default=512)
    p.add_argument("--batch-per-rank", "-b", type=int, default=256)
    p.add_argument("--sample-rate", "-r", type=float, default=0.1, help="rate of the sampled variants")
    p.add_argument("--chunk-size", type=int, default=8192, help="chunk size of the chunked variant")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters and embeddings")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="run the head's forward under torch.autocast with this dtype")
    p.add_argument("--world-size", "-w", type=int, default=2, help="CPU ranks to start (ignored under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU rank")
    p.add_argument("--variants", type=str, default=",".join(VARIANTS), help="comma-separated subset of " +
                   ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=2, help="untimed full steps per variant")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per memory measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU memory: keep glibc's dynamic mmap threshold (freed blocks < 32 MiB may stay resident) "
                        "instead of pinning it to 1 MiB in the memory processes")
    p.add_argument("--validate", action="store_true", help="keep PartialFC's per-step input validation on")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                   help="on: build every variant, then time them round-robin (load changes hit all alike); "
                        "off: one variant after the other, each freed before the next; auto: on for CPU, off for CUDA")
    p.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                   help="how CPU rank processes start (forkserver: fresh processes forked from a server that "
                        "imported torch; spawn: fresh interpreters)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (C_local 4096,8192, d 64, batch 64, 2 ranks, 3 repeats): a < 1 min smoke run")
    p.add_argument("--out", type=str, default="runs/bench", help="output directory (bench.md/.csv/.json/.png)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from launch import bench as this  # functions sent to worker processes by their importable name

    if args.quick:
        args.sweep = args.sweep or "4096,8192"
        args.embedding_size, args.batch_per_rank, args.chunk_size = 64, 64, 1024
        args.world_size, args.warmup, args.repeats, args.memory_steps = 2, 1, 3, 2
    variants = _parse_list(args.variants, str)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    sweep = _parse_list(args.sweep) if args.sweep else [args.classes_per_rank]

    under_torchrun = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    group, rank = None, 0
    cpu_torchrun = under_torchrun and not use_cuda
    if cpu_torchrun:  # CPU ranks started by torchrun: time in this process on its gloo group
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        torch.set_num_threads(args.threads)
        device, world, rank = torch.device("cpu"), dist.get_world_size(), dist.get_rank()
        where = f"CPU, {world} gloo rank(s) started by torchrun x {args.threads} thread(s)"
        memory_note = "not measured (under torchrun the ranks are not fresh processes per case)"
    elif use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if under_torchrun and not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        where = (f"CUDA, {world} rank(s) ({'NCCL group' if world > 1 else 'no process group'})")
        memory_note = ("torch.cuda.max_memory_allocated during the steps minus the allocation after the variant "
                       "was built and one warm-up fwd+bwd (weights + inputs); predicted = partialfc.plan (cuda model)")
    else:
        device = torch.device("cpu")
        world = args.world_size
        where = (f"CPU, {world} gloo rank(s) x {args.threads} thread(s) (torch.multiprocessing "
                 f"{args.start_method}, FileStore rendezvous)")
        memory_note = ("peak RSS (VmHWM / ru_maxrss) of a fresh process group per case minus the RSS after the weights "
                       "were allocated and one warm-up fwd+bwd (max over ranks): includes the weight gradient, "
                       "the optimizer state (step columns) and all temporaries; glibc's mmap threshold "
                       + ("kept dynamic" if args.malloc_default else "pinned to 1 MiB") +
                       " in those processes; predicted = partialfc.plan (device model cpu)")
    base_cfg = BenchConfig(embedding_size=args.embedding_size, batch_per_rank=args.batch_per_rank,
                           sample_rate=args.sample_rate, chunk_size=args.chunk_size, dtype=args.dtype, amp=args.amp,
                           world_size=world, validate=args.validate)
    command = "python -m launch.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = dict(command=command.strip(), machine=machine_info(device), where=where, memory_note=memory_note,
                config=asdict(base_cfg), sweep=sweep, variants=variants, warmup=args.warmup, repeats=args.repeats,
                started=datetime.datetime.now().isoformat(timespec="seconds"))
    t_start = time.time()
    rows = []
    for c in sweep:
        cfg = replace(base_cfg, classes_per_rank=c)
        if cpu_torchrun:
            part = time_variants(cfg, variants, args.warmup, args.repeats, device, None,
                                 interleave=args.interleave != "off")
        elif use_cuda:
            part = time_variants(cfg, variants, args.warmup, args.repeats, device, None,
                                 interleave=args.interleave == "on", cuda_memory=not args.no_memory,
                                 memory_steps=args.memory_steps)
        else:
            part = run_group(this.timing_worker, world, cfg, variants, args.warmup, args.repeats,
                             args.interleave != "off", threads=args.threads, start_method=args.start_method)[0]
            if not args.no_memory:
                for r in part:
                    r.update(measure_memory_cpu(cfg, r["variant"], args.memory_steps, args.start_method,
                                                not args.malloc_default))
        for r in part:
            plan = predict(cfg, r["variant"], "cuda" if use_cuda else "cpu")
            if plan is not None:
                r["pred_fb"], r["pred_step"] = plan["fwd_bwd"]["above_weights"], plan["step"]["above_weights"]
                r["plan_weights"] = plan["weights"]
        rows.extend(part)
        if rank == 0:
            print(markdown_table(part), flush=True)
    meta["seconds"] = round(time.time() - t_start, 1)
    if rank == 0:
        paths = write_outputs(rows, args.out, meta)
        for c in evaluate_targets(rows):
            value = f"{c['value']:.3f}" if isinstance(c["value"], float) else c["value"]
            print(f"[{'met' if c['met'] else 'MISSED'}] C={c['C']}: {c['name']} = {value} (target {c['target']})")
        print("wrote " + ", ".join(paths.values()) + f" in {meta['seconds']} s")
    if dist.is_initialized() and under_torchrun:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

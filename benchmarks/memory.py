"""Memory above the weights: fresh-process RSS on CPU, ``max_memory_allocated`` on CUDA, and the
planner's prediction (:func:`partialfc.plan.plan_memory`) beside them.

CPU: each (configuration, variant) runs in a fresh group of processes (:func:`measure_memory_cpu`)
and reports its peak resident set size (VmHWM, i.e. ``getrusage().ru_maxrss`` without the marks
left by exited threads; ``ru_maxrss`` where /proc is missing), the high-water mark reset through
/proc/self/clear_refs at the baseline, minus the RSS after the weights were allocated and one
warm-up forward+backward; max over ranks. Measured after ``steps`` forward+backward steps
(``mem_fb``) and after as many full steps with the optimizer (``mem_step``).
"""
from __future__ import annotations

import gc
import os
import resource
import sys
from typing import Optional

import torch

from partialfc.plan import plan_memory

from .config import SUB_CENTERS, MiB, BenchConfig, nbytes
from .runner import run_group
from .variants import Case


def rss_bytes() -> int:
    """Current resident set size of this process (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is all we have
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM (Linux), else ``getrusage(RUSAGE_SELF).ru_maxrss``.

    Both are the same high-water mark, except that ru_maxrss also keeps the mark recorded when a
    thread of the process exits, which clearing the mark (:func:`reset_peak_rss`) does not undo."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_parts() -> dict:
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


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pin_malloc_threshold(nbytes: int = MiB) -> bool:
    """Fix glibc's mmap threshold (no dynamic growth up to 32 MiB): buffers >= ``nbytes`` are mapped
    and go back to the OS when freed, so the RSS follows what is allocated instead of keeping
    freed heap blocks resident. False where this is not glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _drop_grads(case: Case):
    """Forget the gradients of the last step (and collect what they held)."""
    case.opt.zero_grad(set_to_none=True)
    case.embeddings.grad = None
    gc.collect()


def memory_worker(rank: int, world: int, cfg: BenchConfig, variant: str, steps: int,
                  pin_malloc: bool = True) -> dict:
    """Run in a fresh process: RSS above the weights after fwd+bwd steps, then after full steps.

    One forward+backward of the same head runs before the baseline is read (its gradient is
    then dropped), so that one-time library state (kernels, oneDNN primitives and scratch for
    these shapes, autograd engine, gloo buffers: 5-15 MB) is not counted as the head's."""
    pinned = pin_malloc_threshold() if pin_malloc else False
    case = Case(variant, cfg, torch.device("cpu"), None)
    case.fwd_bwd()
    _drop_grads(case)
    base = rss_bytes()
    reset = reset_peak_rss()
    slack = peak_rss_bytes() - base  # > 0 when the reset failed: earlier peaks hide small ones
    parts_base = rss_parts()
    for _ in range(steps):
        case.fwd_bwd()
    mem_fb = peak_rss_bytes() - base
    for _ in range(steps):
        case.step()
    mem_step = peak_rss_bytes() - base
    parts_end = rss_parts()
    return dict(mem_fb=mem_fb, mem_step=mem_step, mem_base=base,
                weights=sum(nbytes(p) for p in case.head.parameters()), peak_reset=reset,
                reset_slack=slack, malloc_pinned=pinned,
                rss_file_growth=parts_end.get("RssFile", 0) - parts_base.get("RssFile", 0),
                rss_parts_base=parts_base, rss_parts_end=parts_end)


def measure_memory_cpu(cfg: BenchConfig, variant: str, steps: int = 2, start_method: str = "forkserver",
                       pin_malloc: bool = True) -> dict:
    """:func:`memory_worker` in a fresh group of ``cfg.world_size`` processes; max over ranks."""
    per_rank = run_group(memory_worker, cfg.world_size, cfg, variant, steps, pin_malloc,
                         start_method=start_method, label="bench memory group")
    res = dict(per_rank[0])
    for key in ("mem_fb", "mem_step", "reset_slack"):
        res[key] = max(r[key] for r in per_rank)
    res["peak_reset"] = all(r["peak_reset"] for r in per_rank)
    return res


def measure_memory_cuda(case: Case, device, steps: int = 2) -> dict:
    """``max_memory_allocated`` during ``steps`` fwd+bwd, then full steps, minus the allocation
    after the case was built and one warm-up fwd+bwd (whose gradient is dropped again)."""
    case.fwd_bwd()  # warm-up: cuBLAS workspace, kernels
    _drop_grads(case)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    res = {}
    for key, fn in (("mem_fb", case.fwd_bwd), ("mem_step", case.step)):
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        res[key] = torch.cuda.max_memory_allocated(device) - base
    case.opt.zero_grad(set_to_none=True)
    res["mem_base"] = base
    return res


def predict(cfg: BenchConfig, variant: str, device: str) -> Optional[dict]:
    """The planner's prediction for a variant (None for the baseline head and the margins the
    planner does not model: AdaFace, CurricularFace; ``filtered`` is planned as ``materialized``,
    ``filtered_sparse``, whose sparse gradient holds a varying share of the rows, not at all; the
    triton kernels through their custom ops' fake implementations)."""
    if variant in ("baseline", "adaface", "curricularface", "filtered_sparse"):
        return None
    return plan_memory(classes_per_rank=cfg.classes_per_rank, embedding_size=cfg.embedding_size,
                       world_size=cfg.world_size, batch_per_rank=cfg.batch_per_rank,
                       sample_rate=cfg.sample_rate if variant.startswith("sampled") else 1.0,
                       dtype=cfg.dtype, mm_dtype=cfg.mm_dtype, embedding_dtype=cfg.dtype,
                       optimizer="sparse_sgd" if variant == "sampled_sparse" else "sgd_momentum",
                       chunk_size=cfg.chunk_size if variant == "chunked" else None,
                       sparse_grad=variant == "sampled_sparse", device=device,
                       sub_centers=SUB_CENTERS if variant == "subcenter" else 1,
                       impl="triton" if variant == "triton" else "torch")

"""Step times of the variants on this rank, beside the bare matrix products of the same shapes.

Median over repeats of forward+backward, of the full step (+ optimizer) and of the three bare
products, each timed after a barrier (and, on CUDA, between synchronizations); per repeat the
slowest rank counts. Interleaved (CPU default): every variant is built first and they are
timed round-robin, one repeat of each in turn, so a change of machine load hits them alike.
eta = matmul time / forward+backward time, the median of the per-round ratios.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from launch.distributed import barrier
from partialfc.collectives import all_reduce_, group_size

from .comm import CommCounter
from .config import BenchConfig, nbytes
from .memory import measure_memory_cuda
from .variants import Case, filter_accuracy, matmul_tensors, matmuls


def sync(device):
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes on this rank, started after a barrier of the default group."""
    barrier()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs) -> float:
    """Median, NaN for an empty list."""
    return statistics.median(xs) if xs else float("nan")


def prepare(case: Case, cfg: BenchConfig, cache: dict, warmup: int, device):
    """Warm-up steps and products, then one full step with its collectives recorded."""
    for _ in range(warmup):
        case.step()
    x, w, g = matmul_tensors(cache, case.matmul_rows(), cfg, device)
    for _ in range(max(1, warmup)):
        matmuls(x, w, g)
    sync(device)
    with CommCounter(group_size()) as counter:
        case.step()
    sync(device)
    case.coll = (counter.sent_bytes(), counter.get_total_counts(), counter.detail())


def one_round(case: Case, cfg: BenchConfig, cache: dict, device):
    """One repeat: forward+backward, full step, the three products."""
    x, w, g = matmul_tensors(cache, case.matmul_rows(), cfg, device)
    case.times["fb"].append(timed(case.fwd_bwd, device))
    case.times["step"].append(timed(case.step, device))
    case.times["mm"].append(timed(lambda: matmuls(x, w, g), device))


def slowest_rank(case: Case, device) -> tuple[list, list, list]:
    """Per repeat, the slowest rank's fwd+bwd, step and matmul seconds."""
    t = torch.tensor([case.times["fb"], case.times["step"], case.times["mm"]], dtype=torch.float64)
    t = all_reduce_(t.to(device), "max").cpu()
    return tuple(t[i].tolist() for i in range(3))


def result_row(case: Case, cfg: BenchConfig, device) -> dict:
    """The table row of a timed case."""
    fb_all, st_all, mm_all = slowest_rank(case, device)
    fb = median(fb_all)
    c, b, d = case.matmul_rows(), cfg.global_batch, cfg.embedding_size
    sampled = case.variant.startswith("sampled")
    row = dict(variant=case.variant, classes_per_rank=cfg.classes_per_rank, rows=c, global_batch=b,
               embedding_size=d, dtype=cfg.dtype, amp=cfg.amp, world_size=group_size(),
               sample_rate=cfg.sample_rate if sampled else 1.0,
               chunk_size=cfg.chunk_size if case.variant == "chunked" else None,
               t_fb=fb, t_step=median(st_all), t_mm=median(mm_all),
               eta=median([m / f for m, f in zip(mm_all, fb_all)]),  # per round: side by side
               gflops=6.0 * b * c * d / fb / 1e9, t_fb_all=fb_all, t_step_all=st_all, t_mm_all=mm_all,
               weights=sum(nbytes(p) for p in case.head.parameters()),
               coll_bytes=case.coll[0], coll_calls=case.coll[1], coll_detail=case.coll[2],
               repeats=len(case.times["fb"]))
    row.update(case.cuda_mem)
    if case.variant.startswith("filtered"):  # skipped share, true error and bound (untimed; collectives)
        row.update(filter_accuracy(case))
    return row


def _interleaved(cfg, variants, warmup, repeats, device) -> list[dict]:
    """Build every variant, time them round-robin."""
    cache = {}
    cases = [Case(v, cfg, device) for v in variants]
    for case in cases:
        prepare(case, cfg, cache, warmup, device)
    for _ in range(repeats):
        for case in cases:
            one_round(case, cfg, cache, device)
    return [result_row(case, cfg, device) for case in cases]


def _one_variant(v, cfg, warmup, repeats, device, cuda_memory, memory_steps) -> list[dict]:
    """Build, (measure,) time one variant; ``[]`` when it runs out of CUDA memory."""
    oom = getattr(torch, "OutOfMemoryError", RuntimeError)
    try:
        case, cache = Case(v, cfg, device), {}
        if cuda_memory:
            case.cuda_mem = measure_memory_cuda(case, device, memory_steps)
        prepare(case, cfg, cache, warmup, device)
        for _ in range(repeats):
            one_round(case, cfg, cache, device)
        return [result_row(case, cfg, device)]
    except oom:  # e.g. the baseline head at millions of classes: skip the variant, keep the run
        if device.type != "cuda":
            raise
        print(f"[bench] {v} at C_local={cfg.classes_per_rank:,}: out of memory, skipped", flush=True)
        return []


def _sequential(cfg, variants, warmup, repeats, device, cuda_memory, memory_steps) -> list[dict]:
    """One variant after the other, each freed before the next (large GPU runs)."""
    rows = []
    for v in variants:
        rows += _one_variant(v, cfg, warmup, repeats, device, cuda_memory, memory_steps)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def time_variants(cfg: BenchConfig, variants, warmup: int, repeats: int, device, interleave: bool = True,
                  cuda_memory: bool = False, memory_steps: int = 2) -> list[dict]:
    """Time the variants on this rank of the default group (every rank must call it alike).

    ``interleave``: build every variant first and time them round-robin, so that load changes
    hit them alike; otherwise one after the other, freeing each before the next (large GPU runs;
    ``cuda_memory`` then measures each one's peak first). One row per variant, timings as the
    median over repeats of the slowest rank.
    """
    if interleave:
        return _interleaved(cfg, variants, warmup, repeats, device)
    return _sequential(cfg, variants, warmup, repeats, device, cuda_memory, memory_steps)


def timing_worker(rank: int, world: int, cfg: BenchConfig, variants, warmup: int, repeats: int,
                  interleave: bool = True) -> list[dict]:
    """:func:`time_variants` on one CPU rank of a :func:`benchmarks.runner.run_group` group."""
    return time_variants(cfg, variants, warmup, repeats, torch.device("cpu"), interleave=interleave)


"""Benchmark of the PartialFC head: step time, matmul efficiency, memory, collective traffic.

    python -m benchmarks                          # target configuration, 2 gloo ranks on CPU
    python -m benchmarks --quick --out runs/bq    # tiny shapes, < 1 minute (used by the tests)
    python -m benchmarks --sweep 25000,50000,100000 --out runs/bench
    torchrun --nproc-per-node 8 -m benchmarks --classes-per-rank 1000000 --batch-per-rank 128 \\
        --dtype bf16 --variants materialized,chunked,sampled_sparse     # several GPUs

``python -m launch.bench`` is the same command (an alias kept for old command lines).

Where it runs:
  * CPU (default without CUDA): ``--world-size`` ranks (default 2) started with
    torch.multiprocessing and joined in a gloo group through a FileStore, ``--threads`` (default 1)
    intra-op threads each (benchmarks.runner).
  * one GPU: world 1, no process group.
  * several GPUs: under ``torchrun`` (``LOCAL_RANK``/``WORLD_SIZE`` set) on the NCCL group it
    initialises (or the one that already exists).

Variants (the rows of the table; benchmarks.variants):
  materialized    PartialFC default: one (B, C_local) logits buffer; torch.optim.SGD(momentum)
  chunked         PartialFC(chunk_size=--chunk-size): logits recomputed per block in backward
  sampled_dense   PartialFC(sample_rate=r); torch.optim.SGD(momentum) on the dense gradient
  sampled_sparse  PartialFC(sample_rate=r, sparse_grad=True); partialfc.optim.SparseSGD(momentum)
  baseline        a plain autograd head: autograd all-gather, F.normalize of x and W, full
                  logits, acos/cos over the whole matrix, softmax cross-entropy from torch ops
                  with all-reduces (F.cross_entropy on one rank)
  filtered        (opt-in) materialized with PartialFC(grad_filter=--grad-filter,
                  grad_filter_block=--grad-filter-block): class blocks of negligible softmax gradient
                  skipped in backward; the table below the main one gives the share of blocks skipped
                  and the gradients' relative error against the exact head next to the reported bound
  filtered_sparse (opt-in) the same with sparse_grad=True and SparseSGD (only kept rows move)

Trained-like logits: --target-angle A places every embedding A degrees from its class's row of
the PartialFC heads' initial weights (random class centres in d dimensions); without it the
embeddings are random, the softmax is spread and the filter skips nothing.

Timing (benchmarks.timing): median over --repeats of forward+backward and of
forward+backward+optimizer step (after --warmup steps; barrier before and, on CUDA, synchronize
around each timing; per repeat the slowest rank counts), and, timed in the same rounds, the
three bare matrix products of the same shapes (x W^T: (B, d)(d, C); G W: (B, C)(C, d);
G^T x: (C, B)(B, d), C = the sampled rows for sampled variants). Variants are timed
round-robin (one repeat of each in turn), so a change of machine load hits them alike.
eta = matmul time / forward+backward time, the median over rounds of the per-round ratio;
GFLOP/s = 6 B C d / median fwd+bwd. Step-time ratios between variants in the summary are
medians of per-round ratios as well.

Memory (benchmarks.memory): on CUDA ``max_memory_allocated`` during the steps minus the
allocation after the variant was built and warmed up; on CPU each (configuration, variant) runs
in a fresh group of processes and reports its peak resident set size (VmHWM), the high-water
mark reset at the baseline, minus the RSS after the weights were allocated and one warm-up
forward+backward: "memory above the weights", max over ranks. It is measured after
--memory-steps forward+backward steps (``mem_fb``) and after as many full steps with the
optimizer (``mem_step``, includes the optimizer state), and set beside the prediction of
:mod:`partialfc.plan` (``pred_fb``, ``pred_step``).

Collective bytes (benchmarks.comm): the collectives of one full step are recorded with torch's
CommDebugMode; ``coll_calls`` is its count, ``coll_bytes`` what one rank sends under ring
algorithms (all-gather (W-1)*in, reduce-scatter (W-1)*out, all-reduce 2(W-1)/W*n),
``coll_detail`` the payload of each call.

Outputs in --out (benchmarks.report): bench.md, bench.csv, bench.json and bench.png (fwd+bwd
time and memory above the weights against the classes per rank). The report states figures;
the targets are in docs/benchmarks.md.
"""
import importlib

# loaded on first use, so that ``benchmarks.runner`` (which tests/dist_utils uses) imports
# neither the heads nor the planner
_EXPORTS = {"BenchConfig": "config", "DTYPES": "config", "VARIANTS": "config", "DEFAULT_VARIANTS": "config",
            "memory_worker": "memory"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """``benchmarks.BenchConfig`` etc.: the names of :data:`_EXPORTS`, from their modules."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

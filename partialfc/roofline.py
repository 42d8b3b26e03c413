"""A roofline time model of one forward+backward of the head on one rank, per implementation.

Each implementation is a list of passes; a pass is a matrix product (``flops``) or an elementwise
pass over memory (``bytes`` moved, ``elements`` touched). On a device with matrix-product
throughput ``F`` (FLOP/s, for the product dtype), memory bandwidth ``W`` (bytes/s) and elementwise
throughput ``E`` (elements/s; ``exp`` at its own rate), a pass takes::

    product      max(flops / F, bytes / W)
    elementwise  max(bytes / W, elements / E)

and the step the sum of its passes (no overlap between passes: kernels run one after the other).
``eta`` = time of the three bare products of the same shapes (x W^T, G W, G^T x) / step time,
the figure ``python -m benchmarks`` measures.

Shapes: B rows of the gathered batch, C classes of this rank (the sampled ones with sampling), d;
``e`` bytes per element of the product dtype, logits and gradients accumulate in float32 (4 bytes).

- ``materialized`` (torch path, default): the (B, C) product, a float32 copy when ``e < 4``, scale,
  max, subtract, exp, sum; backward: row factor, column scale, a cast to the product dtype when
  ``e < 4``, the two gradient products, the radial projection of the weight gradient.
- ``chunked``: the same passes per block and, in backward, the block's logits recomputed
  (product, scale, subtract, exp, row factor): 4 products. Blocks are assumed to go to memory
  (a GPU's L2 holds ~50 MB: B 1024 × 8192 float32 is 32 MB, so some of it may stay on chip).
- ``fused`` (the Triton kernels of ``impl="triton"``, :mod:`partialfc.triton_softmax`, which never
  form B × C in memory): forward one product with an online max / sum-exp; backward two kernels,
  each recomputing its tiles: one forms grad x = G W (over row blocks), the other grad W = G^T x
  (over class blocks, the radial projection in its epilogue): 5 products, memory traffic
  O((B + C) d) — reads of W (``w_reads`` times per pass: 1 with a launch order that reuses each W
  tile from L2 across row blocks) and of x, the gradient of W written once.

The weights and their gradient are in the product dtype (bf16 parameters, as on GPUs); the radial
projection of the weight gradient (all impls) works on row slices that stay in cache, so it moves
W and grad W once each way.

The device table holds published dense peak figures (``DEVICES``); measured throughput is lower,
which is why :func:`calibrate_cpu` measures this machine's F, W and E and the CLI compares the
model with the real head's step on it.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Optional

IMPLS = ("materialized", "chunked", "fused")


@dataclass(frozen=True)
class Device:
    """Peak throughputs: ``flops`` per product dtype (FLOP/s), ``bandwidth`` (bytes/s),
    ``elementwise`` and ``exp`` (elements/s; None = limited by memory only)."""

    name: str
    flops: dict
    bandwidth: float
    elementwise: Optional[float] = None
    exp: Optional[float] = None


#: published dense peaks (NVIDIA H100 SXM5 and H200 SXM datasheets): tensor-core bf16/fp16 989.4
#: TFLOP/s, TF32 494.7, fp32 (no tensor cores) 66.9; HBM3 3.35 TB/s, HBM3e 4.8 TB/s.
DEVICES = {
    "H100": Device("H100 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}, 3.35e12),
    "H200": Device("H200 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}, 4.8e12),
}
_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}


@dataclass(frozen=True)
class Pass:
    name: str
    kind: str  # "mm", "elementwise" or "exp"
    flops: float = 0.0
    bytes: float = 0.0
    elements: float = 0.0


def _elementwise(name: str, elements: float, bytes_per_element: float, kind: str = "elementwise") -> Pass:
    return Pass(name, kind, bytes=elements * bytes_per_element, elements=elements)


def passes(impl: str, batch: int, classes: int, d: int, dtype: str = "bf16", w_reads: int = 1) -> list[Pass]:
    """The passes of one forward+backward of ``impl`` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"roofline: impl must be one of {IMPLS}, got {impl!r}")
    if dtype not in _BYTES:
        raise ValueError(f"roofline: dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    b, c, e = float(batch), float(classes), _BYTES[dtype]
    bc, cd, bd = b * c, c * d, b * d
    mm = 2.0 * bc * d
    x_in, w_in = bd * e, cd * e
    # the radial projection runs on row slices that stay in cache: grad W and W read, grad W written once
    weight_side = [_elementwise("weight row norms", cd, e), _elementwise("radial projection of grad W", cd, 3 * e)]
    if impl == "fused":
        return [Pass("fwd: product + online max/sum-exp", "mm", mm, w_reads * w_in + x_in),
                Pass("bwd 1: recompute", "mm", mm, w_reads * w_in + x_in),
                Pass("bwd 1: grad x = G W (on chip)", "mm", mm, bd * 4),
                Pass("bwd 2: recompute", "mm", mm, w_in + w_reads * x_in),
                Pass("bwd 2: grad W = G^T x, projected (on chip)", "mm", mm, cd * e),
                _elementwise("weight row norms", cd, e)]
    cast = [_elementwise("fp32 copy of the logits", bc, e + 4)] if e < 4 else []
    to_mm = [_elementwise("cast G to the product dtype", bc, 4 + e)] if e < 4 else []
    logits = [Pass("product x W^T", "mm", mm, x_in + w_in + bc * e)] + cast + [
        _elementwise("scale s/|w_j|", bc, 8)]
    forward = logits + [_elementwise("row max", bc, 4), _elementwise("subtract max", bc, 8),
                        _elementwise("exp", bc, 8, "exp"), _elementwise("row sum", bc, 4)]
    recompute = []
    if impl == "chunked":
        recompute = [Pass(f"bwd: {p.name} (recomputed)", p.kind, p.flops, p.bytes, p.elements) for p in logits] + [
            _elementwise("bwd: subtract global max (recomputed)", bc, 8),
            _elementwise("bwd: exp (recomputed)", bc, 8, "exp")]
    backward = recompute + [_elementwise("bwd: row factor", bc, 8), _elementwise("bwd: column scale 1/|w_j|", bc, 8)] \
        + to_mm + [Pass("bwd: grad x = G W", "mm", mm, bc * e + w_in + bd * 4),
                   Pass("bwd: grad W = G^T x", "mm", mm, bc * e + x_in + cd * e)]
    return forward + backward + weight_side


def pass_time(p: Pass, device: Device, dtype: str) -> float:
    """Seconds of one pass on ``device`` (the roofline: the slower of compute and memory)."""
    memory = p.bytes / device.bandwidth
    if p.kind == "mm":
        return max(p.flops / device.flops[dtype], memory)
    rate = device.exp if p.kind == "exp" and device.exp else device.elementwise
    return max(memory, p.elements / rate) if rate else memory


def predict(impl: str, batch: int, classes: int, d: int, device: Device, dtype: str = "bf16",
            w_reads: int = 1) -> dict:
    """Predicted forward+backward: ``seconds``, ``eta`` (bare products / step), ``flops``, ``bytes``
    and the share of time in products (``mm_share``)."""
    ps = passes(impl, batch, classes, d, dtype, w_reads)
    times = [pass_time(p, device, dtype) for p in ps]
    bare = sum(pass_time(p, device, dtype) for p in passes("materialized", batch, classes, d, dtype)
               if p.kind == "mm")
    total = sum(times)
    return {"impl": impl, "seconds": total, "eta": bare / total, "flops": sum(p.flops for p in ps),
            "bytes": sum(p.bytes for p in ps),
            "mm_share": sum(t for p, t in zip(ps, times) if p.kind == "mm") / total}


# ------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch of fresh buffers
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def calibrate_cpu(batch: int = 512, classes: int = 100_000, d: int = 512, repeats: int = 3) -> Device:
    """This CPU as a :class:`Device` (fp32, the threads torch uses now): product throughput of the
    head's own product shape, streaming bandwidth of an in-place multiply, and element rates of
    a multiply and of ``exp`` over a (batch, classes) float32 buffer."""
    import torch
    x, w = torch.randn(batch, d), torch.randn(classes, d)
    out = torch.empty(batch, classes)
    t_mm = _median_time(lambda: torch.mm(x, w.t(), out=out), repeats)
    t_mul = _median_time(lambda: out.mul_(1.0000001), repeats)
    out.clamp_(-5, 5)
    t_exp = _median_time(lambda: torch.exp(out, out=out).clamp_(max=5.0), repeats) - t_mul  # exp_ alone
    n = float(batch) * classes
    bandwidth = 8 * n / t_mul
    return Device("this CPU (measured)", {"fp32": 2.0 * n * d / t_mm}, bandwidth,
                  elementwise=n / t_mul, exp=n / max(t_exp, 1e-9))


def measure_head(impl: str, batch: int, classes: int, d: int, repeats: int = 3, chunk_size: int = 8192) -> float:
    """Median seconds of the real head's forward+backward on one process (fp32)."""
    import torch
    from .head import PartialFC
    head = PartialFC(d, classes, chunk_size=chunk_size if impl == "chunked" else None, validate=False,
                     uniform_batch=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g)

    def step():
        head.weight.grad = None
        x.grad = None
        head(x, y).backward()
    return _median_time(step, repeats)


def gpu_table(devices=("H100", "H200"), classes=(100_000, 300_000, 1_000_000, 3_000_000, 10_000_000),
              batch: int = 1024, d: int = 512, dtype: str = "bf16") -> list[dict]:
    """Predicted ms and eta of every impl on the named devices."""
    rows = []
    for name in devices:
        for c in classes:
            for impl in IMPLS:
                p = predict(impl, batch, c, d, DEVICES[name], dtype)
                rows.append({"device": name, "classes": c, **p})
    return rows


def main(argv=None) -> int:
    """``python -m partialfc.roofline``: the GPU table, and with ``--calibrate-cpu`` the model on this
    CPU next to the real head's measured step."""
    ap = argparse.ArgumentParser(prog="python -m partialfc.roofline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024, help="global batch B of the GPU table")
    ap.add_argument("--embedding-size", "-d", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=sorted(_BYTES))
    ap.add_argument("--calibrate-cpu", action="store_true",
                    help="measure this CPU and compare the model with the real head (B 512, C 100k, fp32)")
    ap.add_argument("--cpu-classes", type=int, default=100_000)
    ap.add_argument("--cpu-batch", type=int, default=512)
    args = ap.parse_args(argv)
    print(f"roofline, B = {args.batch}, d = {args.embedding_size}, {args.dtype}: predicted forward+backward per rank")
    print("| device | C_local | impl | ms | η | TFLOP | GB moved | time in products |")
    print("|---|---|---|---|---|---|---|---|")
    for r in gpu_table(batch=args.batch, d=args.embedding_size, dtype=args.dtype):
        print(f"| {r['device']} | {r['classes']:,} | {r['impl']} | {1e3 * r['seconds']:.2f} | {r['eta']:.2f} | "
              f"{r['flops'] / 1e12:.2f} | {r['bytes'] / 1e9:.1f} | {100 * r['mm_share']:.0f} % |")
    if args.calibrate_cpu:
        import torch
        b, c, d = args.cpu_batch, args.cpu_classes, args.embedding_size
        cpu = calibrate_cpu(b, c, d)
        print(f"\nthis CPU ({torch.get_num_threads()} thread(s)): products {cpu.flops['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bandwidth {cpu.bandwidth / 1e9:.1f} GB/s, multiply {cpu.elementwise / 1e9:.2f} G/s, "
              f"exp {cpu.exp / 1e9:.2f} G/s")
        print("| impl | predicted ms | measured ms | measured / predicted | predicted η |")
        print("|---|---|---|---|---|")
        for impl in ("materialized", "chunked"):
            p = predict(impl, b, c, d, cpu, "fp32")
            t = measure_head(impl, b, c, d)
            print(f"| {impl} | {1e3 * p['seconds']:.0f} | {1e3 * t:.0f} | {t / p['seconds']:.2f} | {p['eta']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

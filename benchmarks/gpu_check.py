"""One CUDA GPU, world 1: the torch and triton paths of PartialFC against the float64 oracle, with
their peak memory (run by benchmarks/gpu.sh; prints a table, exits 1 if the triton path is wrong).

    python -m benchmarks.gpu_check [--classes 100000,1000000] [--batch 1024] [--dim 512]

Per case (dtype, C_local): loss, embedding gradient and weight gradient of each path, as the max
absolute error over the max absolute value of the float64 oracle (tests/oracle.py, computed on the
GPU); "extra MiB" is the peak allocation of forward+backward above what existed before it plus the
weight gradient, against the issue's bound 2 (B d + C_local) 4 bytes.
"""
from __future__ import annotations

import argparse
import sys

import torch

from partialfc import CombinedMargin, CurricularFace, PartialFC
from tests.oracle import reference_grads

MiB = 2 ** 20


def _case(impl, dtype, c, b, d, x64, labels, w64, margin):
    head = PartialFC(d, c, margin=margin, impl=impl, device="cuda", dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(w64)
    x = x64.to(dtype).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = head(x, labels)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - head.weight.numel() * head.weight.element_size()
    return loss.detach().double(), x.grad.double(), head.weight.grad.double(), extra


def _extensions(b: int, d: int, c: int = 100_000, device: str = "cuda") -> bool:
    """Sub-centers (k 3) and CurricularFace (two steps, so its running t counts): the triton path
    against the torch path on the same weights, fp32 (both fused and reference run on the GPU)."""
    cases = {"arcface, 3 sub-centers": (lambda: CombinedMargin.arcface(s=64.0, m=0.5), 3),
             "curricularface": (lambda: CurricularFace(s=64.0, m=0.5), 1)}
    print(f"\n| case (fp32, C_local {c}, 2 steps) | loss rel diff | x grad rel diff | w grad rel diff |")
    print("|---|---|---|---|")
    ok = True
    for name, (make, k) in cases.items():
        g = torch.Generator(device=device).manual_seed(7)
        w = torch.randn(c * k, d, device=device, generator=g) * 0.01
        xs = [torch.randn(b, d, device=device, generator=g) for _ in range(2)]
        ys = [torch.randint(0, c, (b,), device=device, generator=g) for _ in range(2)]
        out = {}
        for impl in ("torch", "triton"):
            head = PartialFC(d, c, margin=make(), impl=impl, device=device, sub_centers=k)
            with torch.no_grad():
                head.weight.copy_(w)
            res = []
            for x, y in zip(xs, ys):
                x = x.clone().requires_grad_()
                head.weight.grad = None
                loss = head(x, y)
                loss.backward()
                res.append((loss.detach(), x.grad, head.weight.grad.clone()))
            out[impl] = res[-1]
            del head
            if device == "cuda":
                torch.cuda.empty_cache()
        e = [float((a - r).abs().max() / r.abs().max().clamp_min(1e-30)) for a, r in zip(out["triton"], out["torch"])]
        print(f"| {name} | {e[0]:.2e} | {e[1]:.2e} | {e[2]:.2e} |", flush=True)
        if max(e) > 1e-4:
            ok = False
            print(f"FAIL: triton differs from torch for {name}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    p.add_argument("--classes", default="100000,1000000")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    args = p.parse_args(argv)
    b, d = args.batch, args.dim
    margin = CombinedMargin.arcface(s=64.0, m=0.5)
    ok = True
    print(f"B {b}, d {d}, ArcFace s=64 m=0.5, {torch.cuda.get_device_name()}")
    print("| dtype | C_local | impl | loss rel err | x grad rel err | w grad rel err | extra MiB | bound MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for c in [int(v) for v in args.classes.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(c)
        x64 = torch.randn(b, d, device="cuda", dtype=torch.float64, generator=g)
        w64 = torch.randn(c, d, device="cuda", dtype=torch.float64, generator=g) * 0.01
        labels = torch.randint(0, c, (b,), device="cuda", generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            xr, wr = x64.to(dtype).double(), w64.to(dtype).double()  # the oracle sees the rounded inputs
            ref = reference_grads(xr, wr, labels, s=margin.s, m1=margin.m1, m2=margin.m2, m3=margin.m3,
                                  extension=margin.extension)
            torch.cuda.empty_cache()
            errs = {}
            for impl in ("torch", "triton"):
                try:
                    out = _case(impl, dtype, c, b, d, x64, labels, w64, margin)
                except torch.OutOfMemoryError:
                    print(f"| {dtype} | {c} | {impl} | out of memory | | | | |")
                    continue
                e = [float((o - r).abs().max() / r.abs().max()) for o, r in zip(out[:3], ref)]
                errs[impl] = e
                bound = 2 * (b * d + c) * 4 / MiB
                print(f"| {str(dtype)[6:]} | {c} | {impl} | {e[0]:.2e} | {e[1]:.2e} | {e[2]:.2e} | "
                      f"{out[3] / MiB:.1f} | {bound:.1f} |", flush=True)
                del out
                torch.cuda.empty_cache()
            if "triton" in errs and "torch" in errs:
                floor = 1e-6 if dtype == torch.float32 else 2e-3
                bad = [i for i in range(3) if errs["triton"][i] > max(3 * errs["torch"][i], floor)]
                if bad:
                    ok = False
                    print(f"FAIL: triton error above 3x torch's ({dtype}, C {c}): {bad}")
            del ref
            torch.cuda.empty_cache()
    ok = _extensions(b, d) and ok
    print("gpu_check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

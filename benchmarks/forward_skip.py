"""Can the *forward* product of a class block be skipped, certified from a cheap summary of it?

The summary tried: each block's centroid direction c and angular radius r (the largest angle
between c and a row of the block). For an embedding x at angle a from c, every row of the block is
within cos(max(0, a - r)) of x, so the block's softmax entries are at most
exp(s * cos(max(0, a - r)) - LSE(x)); the block needs no forward product when that is below eps for
every row of the batch. This prints, on trained-like logits (random unit class centres, each
embedding ``--angle`` degrees from its class's row, ArcFace s 64 m 0.5), the median radius, the
median bound on the cosine next to the true largest cosine of the block, and the fraction of blocks
certified negligible next to the fraction truly negligible (target entries aside)::

    python -m benchmarks.forward_skip --classes 100000 --batch 256 --angle 30 35
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def measure(classes: int, batch: int, d: int, angle: float, blocks, s: float = 64.0, m: float = 0.5,
            eps: float = 1.1920929e-07, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(classes, d, generator=g), dim=1)  # (C, d)
    y = torch.randint(0, classes, (batch,), generator=g)
    u = torch.randn(batch, d, generator=g)
    u = F.normalize(u - (u * w[y]).sum(1, keepdim=True) * w[y], dim=1)
    x = math.cos(math.radians(angle)) * w[y] + math.sin(math.radians(angle)) * u  # (B, d) unit
    cos = x @ w.t()  # (B, C)
    rows = torch.arange(batch)
    logits = s * cos
    logits[rows, y] = s * math.cos(math.radians(angle) + m)
    lse = torch.logsumexp(logits, dim=1)  # (B,)
    cos[rows, y] = -1.0  # target entries aside (they are computed from the B target rows anyway)
    out = []
    for b in blocks:
        nb = classes // b
        wb = w[: nb * b].view(nb, b, d)
        c = F.normalize(wb.mean(dim=1), dim=1)  # (nb, d) centroid directions
        radius = torch.acos((wb * c[:, None, :]).sum(2).clamp(-1, 1)).amax(dim=1)  # (nb,)
        bound = torch.cos((torch.acos((x @ c.t()).clamp(-1, 1)) - radius).clamp_min(0))  # (B, nb)
        true = cos[:, : nb * b].view(batch, nb, b).amax(dim=2)  # (B, nb)
        out.append(dict(block=b, radius_deg=math.degrees(float(radius.median())), bound_cos=float(bound.median()),
                        true_cos=float(true.median()),
                        certified=float((torch.exp(s * bound - lse[:, None]) < eps).all(0).float().mean()),
                        negligible=float((torch.exp(s * true - lse[:, None]) < eps).all(0).float().mean())))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--angle", type=float, nargs="+", default=[30.0, 35.0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 64, 256])
    args = p.parse_args(argv)
    print("| angle | block | radius (median) | bound on cos (median) | true max cos (median) | certified | truly negligible |")
    print("|---|---|---|---|---|---|---|")
    for a in args.angle:
        for r in measure(args.classes, args.batch, args.dim, a, args.blocks):
            print(f"| {a:g}° | {r['block']} | {r['radius_deg']:.1f}° | {r['bound_cos']:.3f} | {r['true_cos']:.3f} | "
                  f"{r['certified']:.1%} | {r['negligible']:.1%} |", flush=True)


if __name__ == "__main__":
    main()

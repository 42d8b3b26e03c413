"""Drop the PartialFC head into an existing plain-DDP training loop (no Accelerate, no launch/ app).

    torchrun --nproc_per_node=2 examples/ddp_example.py        # CPU (gloo) or GPUs (NCCL)
    python examples/ddp_example.py                             # one process, no process group

What to copy into your own trainer:
  1. the backbone is wrapped in DDP (replicated parameters, gradients averaged);
  2. the head needs no DDP: each rank owns different rows of the class weights (a model that holds
     the head may also be wrapped whole in DDP: partialfc keeps the head's rows out of it);
  3. labels are GLOBAL class ids; the head finds which rank holds which class;
  4. the loss is already the global-batch mean, identical on every rank: log it from any rank;
  5. clip with partialfc.clip_grad_norm_, which counts the sharded rows of every rank once.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from partialfc import CombinedMargin, PartialFC, clip_grad_norm_


def run(steps: int = 30, num_classes: int = 50, dim: int = 16, batch: int = 32, seed: int = 0) -> list[float]:
    """Train a tiny MLP on separable synthetic data; returns the loss of every step."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    torch.manual_seed(seed)  # same backbone init on every rank (DDP also broadcasts it)
    centers = torch.randn(num_classes, dim)  # the "identities"
    backbone = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
    if distributed:
        backbone = DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None)
    head = PartialFC(embedding_size=32, num_classes=num_classes, margin=CombinedMargin.arcface(s=16.0, m=0.3),
                     device=device)  # no DDP needed here
    optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                                lr=0.1, momentum=0.9)

    generator = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank reads different samples
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        x = centers[labels] + 0.3 * torch.randn(batch, dim, generator=generator)
        loss = head(backbone(x.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(backbone.parameters(), head.parameters(), max_norm=5.0)
        optimizer.step()
        losses.append(float(loss))
    return losses


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    history = run()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"loss: first {history[0]:.3f}, last {history[-1]:.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()

"""Process-group setup for the launch app: torchrun, ``accelerate launch`` or a plain process.

The backend follows the hardware: NCCL when CUDA is available, gloo otherwise. Multi-node runs
use torchrun's own rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``), which
set the environment read here; nothing is hard-coded.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def setup_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Initialise the default group from the launcher's environment; ``(rank, world, local_rank)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

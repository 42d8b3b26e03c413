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
        timeout = datetime.timedelta(seconds=timeout_s)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(world, timeout), rank=int(os.environ["RANK"]),
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def _attempt_store(world: int, timeout: datetime.timedelta) -> "dist.Store":
    """torchrun's store, under a prefix of its own for each restart attempt.

    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt, and with plain
    ``env://`` the restarted ranks can read the previous attempt's (dead) gloo addresses and fail
    with "connectFullMesh ... Connection refused". A per-attempt prefix makes every attempt start clean.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent_hosts_store and rank == 0, timeout=timeout,
                         multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"/partialfc/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device="cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce MAX; no collective
    on a single rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

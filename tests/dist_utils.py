"""Run a function on several gloo ranks on CPU, in spawned processes, with a hard timeout.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes that join a gloo
group through a FileStore rendezvous (no ports), run ``fn(rank, world_size, *args)`` and report
back. Any exception on any rank fails the calling test with that rank's traceback; a rank that
hangs is killed after ``timeout`` seconds and fails the test instead of blocking CI.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import tempfile
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(rank, world_size, init_file, fn, args, results):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", pickle.dumps(value)))  # plain pickle: no shared memory
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcomes, errors, first_error_at = {}, [], None
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        try:
            while len(outcomes) < world_size:
                remaining = (deadline - datetime.datetime.now()).total_seconds()
                if first_error_at is not None and (datetime.datetime.now() - first_error_at).total_seconds() > 15:
                    break  # the other ranks are stuck in a collective the failed rank never joined
                if remaining <= 0:
                    raise TimeoutError(f"distributed test timed out after {timeout}s; ranks done: {sorted(outcomes)}")
                try:
                    rank, status, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outcomes]
                    if dead:
                        raise RuntimeError(f"rank(s) {dead} died with exit codes "
                                           f"{[procs[i].exitcode for i in dead]}") from None
                    continue
                outcomes[rank] = pickle.loads(value) if status == "ok" else value
                if status == "error":
                    errors.append(f"--- rank {rank} ---\n{value}")
                    first_error_at = first_error_at or datetime.datetime.now()
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("distributed test failed:\n" + "\n".join(errors))
        return [outcomes[r] for r in range(world_size)]

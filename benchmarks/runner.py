"""One process runner: ``fn(rank, world, *args)`` on ``world`` fresh CPU processes in a gloo group.

The ranks join through a FileStore rendezvous (``file://`` init method, no ports), run with
``threads`` intra-op threads each and send back their result (plain pickle, no shared memory).
An exception on any rank is raised in the caller with every failed rank's traceback (the other
ranks get ``error_grace`` seconds to report theirs, then they are assumed stuck in a collective
the failed rank never joined); a rank that dies or a group that runs past ``timeout`` seconds
fails too, and every process is killed on the way out. ``tests/dist_utils.run_distributed`` is
this runner with the test settings (spawn, one thread, short timeouts).
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# what the forkserver imports once, so that each rank forks with it loaded
# (torch.optim imports torch._dynamo lazily: 2-3 s per process otherwise)
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "partialfc", "partialfc.plan")
_preloaded = False


class RankError(RuntimeError):
    """A rank raised, died or the group timed out."""


def _entry(rank, world, init_file, threads, collective_timeout, fn, args, results, stack_dump_after=None):
    """Body of one rank's process: join the group, run ``fn``, report the outcome. A rank still
    running after ``stack_dump_after`` seconds prints every thread's stack to stderr (then goes on),
    so a rank the parent kills for running past its timeout has said where it was."""
    if stack_dump_after is not None:
        faulthandler.dump_traceback_later(stack_dump_after, exit=False)
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def _context(start_method: str):
    """The multiprocessing context; a forkserver preloads :data:`PRELOAD` (once per process)."""
    global _preloaded
    if start_method not in mp.get_all_start_methods():
        start_method = "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver" and not _preloaded:
        ctx.set_forkserver_preload(list(PRELOAD))
        _preloaded = True
    return ctx


def _collect(procs, results, timeout: float, error_grace: float, label: str) -> tuple[dict, list]:
    """Wait for every rank's outcome: ``({rank: value}, [error text])``."""
    world, out, errors, first_error = len(procs), {}, [], None
    deadline = time.monotonic() + timeout
    while len(out) + len(errors) < world:
        now = time.monotonic()
        if first_error is not None and now - first_error > error_grace:
            break  # the others are stuck in a collective the failed rank never joined
        if now > deadline:
            raise RankError(f"{label} timed out after {timeout:.0f}s; ranks done: {sorted(out)}")
        try:
            rank, status, value = results.get(timeout=min(deadline - now, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
            if dead:
                raise RankError(f"{label}: rank(s) {dead} died with exit codes "
                                f"{[procs[r].exitcode for r in dead]}") from None
            continue
        if status == "ok":
            out[rank] = pickle.loads(value)
        else:
            errors.append(f"--- rank {rank} ---\n{value}")
            first_error = first_error or time.monotonic()
    return out, errors


def run_group(fn, world: int, *args, threads: int = 1, timeout: float = 1800.0, start_method: str = "forkserver",
              collective_timeout: float = 300.0, error_grace: float = 15.0, label: str = "group") -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group.

    ``fn`` and ``args`` must pickle (a module-level function). Returns the per-rank results in
    rank order; raises :class:`RankError` naming ``label`` when a rank fails.
    """
    ctx = _context(start_method)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        dump_after = max(1.0, timeout - 5.0)
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, threads, collective_timeout, fn, args,
                                                  results, dump_after), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        errors = ["(not collected)"]
        try:
            out, errors = _collect(procs, results, timeout, error_grace, label)
        finally:
            for p in procs:
                p.join(timeout=1 if errors else 10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    if errors:
        raise RankError(f"{label} failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world)]

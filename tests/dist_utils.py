"""Run a function on several gloo ranks on CPU, in spawned processes, with a hard timeout.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes that join a gloo
group through a FileStore rendezvous (no ports), run ``fn(rank, world_size, *args)`` and report
back. Any exception on any rank fails the calling test with that rank's traceback; a rank that
hangs is killed after ``timeout`` seconds and fails the test instead of blocking CI.

The process runner itself is :func:`benchmarks.runner.run_group` (one implementation for the
tests and the benchmark); this module fixes the test settings.
"""
from __future__ import annotations

from benchmarks.runner import RankError, run_group

COLLECTIVE_TIMEOUT_S = 60


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    try:
        return run_group(fn, world_size, *args, threads=1, timeout=timeout, start_method="spawn",
                         collective_timeout=COLLECTIVE_TIMEOUT_S, label="distributed test")
    except RankError as e:
        raise AssertionError(str(e)) from None

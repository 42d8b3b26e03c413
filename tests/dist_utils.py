"""Run a function on several gloo ranks on CPU, in fresh processes, with a hard timeout.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes that join a gloo
group through a FileStore rendezvous (no ports), run ``fn(rank, world_size, *args)`` and report
back. Any exception on any rank fails the calling test with that rank's traceback; a rank that
hangs is killed after ``timeout`` seconds and fails the test instead of blocking CI.

The process runner itself is :func:`benchmarks.runner.run_group` (one implementation for the
tests and the benchmark); this module fixes the test settings. The ranks come from a forkserver: a
clean process started once per test session (never a fork of the test process itself) that has
imported torch, torch._dynamo and partialfc, so a rank starts in well under a second instead of the
4-5 s that a spawned interpreter spends importing them (the suite's ~120 multi-rank tests spent
minutes there: 104 tests of ten multi-rank files ran in 46 s instead of several minutes).
"""
from __future__ import annotations

from benchmarks.runner import RankError, run_group

COLLECTIVE_TIMEOUT_S = 60


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    try:
        return run_group(fn, world_size, *args, threads=1, timeout=timeout, start_method="forkserver",
                         collective_timeout=COLLECTIVE_TIMEOUT_S, label="distributed test")
    except RankError as e:
        raise AssertionError(str(e)) from None

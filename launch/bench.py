"""``python -m launch.bench``: an alias of ``python -m benchmarks`` (the benchmark package).

Kept for the command lines in the README and docs/benchmarks.md; it forwards every option.
The names below are re-exported for code that imported them from here
(``from launch.bench import BenchConfig, memory_worker``).
"""
from __future__ import annotations

import sys

from benchmarks.cli import build_parser as _build_parser
from benchmarks.cli import main as _main
from benchmarks.config import VARIANTS, BenchConfig
from benchmarks.memory import memory_worker

PROG = "python -m launch.bench"
__all__ = ["BenchConfig", "VARIANTS", "build_parser", "main", "memory_worker"]


def build_parser():
    """``benchmarks.cli.build_parser`` under this command's name."""
    return _build_parser(PROG)


def main(argv=None) -> int:
    """``benchmarks.cli.main`` under this command's name."""
    return _main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())

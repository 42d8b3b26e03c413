"""Train a backbone with the sharded PartialFC head.

    torchrun --nproc_per_node=2 -m launch.train --config configs/glyphs_cpu.yaml [--section.key value ...]
    accelerate launch --num_processes 2 -m launch.train --config configs/glyphs_cpu.yaml
    python -m launch.train --config configs/glyphs_cpu.yaml            # one process, no group

Multi-node: ``torchrun --nnodes=N --node_rank=i --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT ...``;
the checkpoint folder must be on a file system every node sees.

The backbone is replicated (DDP); the head is sharded over the same ranks (each rank owns
different rows). ``PartialFC`` returns the global-batch mean loss and scales the embedding gradient
by the world size, so DDP's averaging hands the backbone the exact gradient. The parts of a run live
in :mod:`launch.trainer` (build, restore, one step, optimizer step, evaluate, save) and
:mod:`launch.loop` (when to do what); this module is the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from launch.config import TrainConfig, load_config
from launch.distributed import teardown
from launch.trainer import Trainer, build_optimizers, lr_factor  # noqa: F401  (re-exported for callers)


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the final summary (rank 0's evaluation, steps, history)."""
    return Trainer(cfg).fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (configs/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    try:
        summary = train(cfg)
    finally:
        teardown()
    if summary.get("preempted"):
        return 143  # 128 + SIGTERM: the scheduler sees a terminated job, the checkpoint resumes it
    if summary["eval"]:
        print(json.dumps({"step": summary["step"], **summary["eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

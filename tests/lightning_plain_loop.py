"""The reference for tests/test_lightning.py: examples/lightning_example.py's model, data and
optimizer in a plain loop with the backbone alone in DDP and the head outside it (as in
examples/ddp_example.py). Run under torchrun; writes OUT/plain_rank<R>.pt with every step's loss and
gradients and the final rows and momentum.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lightning_plain_loop.py \\
        --num-classes 51 --batches 6 --epochs 2 --out OUT

A rank still running after ``--stack-dump-after`` seconds prints its threads' stacks to stderr, so a
hang that the test's timeout kills has said where it was.
"""
import argparse
import datetime
import faulthandler
import importlib.util
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_example.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lightning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_loop(rank, num_classes, batches, epochs):
    import partialfc

    ex = load_example()
    module = ex.FaceModule(num_classes=num_classes, batches=batches)  # only for its backbone and hyperparameters
    h = module.hparams
    backbone = DDP(module.backbone)
    head = ex.make_head(h.embedding_size, num_classes, h.seed)
    params = [*module.backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=h.lr, momentum=0.9)
    data = ex.make_batches(rank, batches, h.batch_size, num_classes, h.dim, h.seed)
    steps = []
    for _ in range(epochs):
        for x, labels in data:
            optimizer.zero_grad(set_to_none=True)
            loss = head(backbone(x), labels)
            loss.backward()
            steps.append({"loss": loss.detach().clone(), "head_grad": head.weight.grad.clone(),
                          "backbone_grads": {n: p.grad.clone() for n, p in module.backbone.named_parameters()}})
            partialfc.clip_grad_norm_(module.backbone.parameters(), head.parameters(), h.max_norm)
            optimizer.step()
    return {"class_range": (head.class_start, head.class_end), "steps": steps,
            "head_weight": head.weight.detach().clone(),
            "head_momentum": optimizer.state[head.weight]["momentum_buffer"].clone()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stack-dump-after", type=float, default=120.0)
    args = p.parse_args()
    faulthandler.dump_traceback_later(args.stack_dump_after, exit=False)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        result = plain_loop(rank, args.num_classes, args.batches, args.epochs)
        torch.save(result, args.out / f"plain_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()

"""PartialFC in a PyTorch Lightning ``Trainer(strategy="ddp")``: training, checkpoints, resuming.

    python examples/lightning_example.py                            # 2 CPU ranks (Lightning starts rank 1)
    torchrun --nproc_per_node=2 examples/lightning_example.py       # the same under torchrun
    python examples/lightning_example.py --devices 1                # one process, no process group
    python examples/lightning_example.py --ckpt-dir ckpts --epochs 1
    python examples/lightning_example.py --resume ckpts/epoch0.ckpt --epochs 2

What to copy into your own LightningModule:
  1. build the head in ``configure_model()``, not ``__init__``: the process group exists only there,
     and the head needs it to know which class rows this rank holds. Lightning's DDP then skips the
     head's rows by itself (no ``find_unused_parameters``, no ignore list to write).
  2. labels are GLOBAL class ids; the loss is already the global-batch mean (the same on every rank).
  3. clip in ``configure_gradient_clipping`` with ``partialfc.clip_grad_norm_`` (Trainer's
     ``gradient_clip_val`` would take a different norm on every rank: each sees only its own rows).
  4. ``on_save_checkpoint``: Lightning writes the checkpoint from rank 0 only, so gather every rank's
     rows first (``consolidate_state_dict`` + ``consolidate_optimizer_state``; every rank runs it).
  5. ``on_load_checkpoint``: cut the optimizer states back to this rank's rows
     (``shard_optimizer_state``); the model's state dict picks its own rows by itself.
Without 4, rank 0's file holds rank 0's rows only and resuming fails on the other ranks with a
``ValueError`` ("it holds other classes' rows") instead of silently training on wrong rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

import partialfc
from partialfc import CombinedMargin, PartialFC


def make_batches(rank: int, num_batches: int, batch_size: int, num_classes: int, dim: int, seed: int = 0):
    """This rank's share of a separable synthetic data set: ``num_batches`` (x, labels) batches."""
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))  # the "identities"
    generator = torch.Generator().manual_seed(seed + 1000 * (rank + 1))  # each rank reads different samples
    batches = []
    for _ in range(num_batches):
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        batches.append((centers[labels] + 0.3 * torch.randn(batch_size, dim, generator=generator), labels))
    return batches


def make_backbone(dim: int, embedding_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, embedding_size))


def make_head(embedding_size: int, num_classes: int, seed: int = 0) -> PartialFC:
    return PartialFC(embedding_size, num_classes, margin=CombinedMargin.arcface(s=16.0, m=0.3), seed=seed)


class FaceModule(L.LightningModule):
    def __init__(self, num_classes: int = 50, dim: int = 16, embedding_size: int = 32, batch_size: int = 32,
                 batches: int = 8, lr: float = 0.1, max_norm: float = 5.0, seed: int = 0, consolidate: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = make_backbone(dim, embedding_size, seed)  # replicated: DDP broadcasts and averages it
        self.head = None  # sharded: built in configure_model, once the process group exists

    def configure_model(self):
        if self.head is None:  # called again for every fit/validate/test: build once
            self.head = make_head(self.hparams.embedding_size, self.hparams.num_classes, self.hparams.seed)

    def train_dataloader(self):
        h = self.hparams
        data = make_batches(self.global_rank, h.batches, h.batch_size, h.num_classes, h.dim, h.seed)
        return DataLoader(data, batch_size=None, shuffle=False)  # already batched, already this rank's share

    def training_step(self, batch, batch_idx):
        x, labels = batch
        loss = self.head(self.backbone(x), labels)  # global-batch mean over all classes of all ranks
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        partialfc.clip_grad_norm_(self.backbone.parameters(), self.head.parameters(), self.hparams.max_norm)

    def on_save_checkpoint(self, checkpoint):
        if not self.hparams.consolidate:
            return
        checkpoint["state_dict"] = partialfc.consolidate_state_dict(self, checkpoint["state_dict"])
        checkpoint["optimizer_states"] = [
            partialfc.consolidate_optimizer_state(self, optimizer, state)
            for optimizer, state in zip(self.trainer.optimizers, checkpoint["optimizer_states"])]

    def on_load_checkpoint(self, checkpoint):
        # Lightning calls this before it creates the optimizers; an optimizer built the same way tells
        # which entries of the state are the head's (only its parameter order is read).
        if "optimizer_states" in checkpoint:  # absent in weights-only checkpoints
            optimizer = self.configure_optimizers()
            checkpoint["optimizer_states"] = [partialfc.shard_optimizer_state(self, optimizer, state)
                                              for state in checkpoint["optimizer_states"]]


class Recorder(L.Callback):
    """For tests (``--out``): per step the loss and gradients, and the head's rows and momentum when
    training starts (after a resume), at every checkpoint save, and at the end."""

    def __init__(self):
        self.steps, self.saved, self.start = [], [], None

    @staticmethod
    def snapshot(module, trainer):
        momentum = None
        if trainer.optimizers and module.head.weight in trainer.optimizers[0].state:
            momentum = trainer.optimizers[0].state[module.head.weight]["momentum_buffer"].clone()
        return {"step": trainer.global_step, "head_weight": module.head.weight.detach().clone(),
                "head_momentum": momentum, "head_step": module.head.step,
                "backbone": {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}}

    def on_train_start(self, trainer, module):
        self.start = self.snapshot(module, trainer)

    def on_before_optimizer_step(self, trainer, module, optimizer):  # after DDP's all-reduce, before clipping
        self.steps.append({"step": trainer.global_step, "head_grad": module.head.weight.grad.clone(),
                           "backbone_grads": {n: p.grad.clone() for n, p in module.backbone.named_parameters()}})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = outputs["loss"].detach().clone()

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.saved.append(self.snapshot(module, trainer))

    def dump(self, module, trainer, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size,
                    "class_range": (module.head.class_start, module.head.class_end), "steps": self.steps,
                    "start": self.start, "saved": self.saved, "end": self.snapshot(module, trainer)},
                   out / f"rank{trainer.global_rank}.pt")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batches", type=int, default=8, help="batches per rank and epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", help="save a checkpoint at the end of every epoch (epoch<N>.ckpt)")
    p.add_argument("--resume", help="checkpoint to resume from")
    p.add_argument("--no-consolidate", action="store_true", help="show what goes wrong without step 4")
    p.add_argument("--out", help="write each rank's steps, gradients and snapshots to OUT/rank<R>.pt")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    model = FaceModule(num_classes=args.num_classes, batch_size=args.batch_size, batches=args.batches,
                       seed=args.seed, consolidate=not args.no_consolidate)
    callbacks = [Recorder()] if args.out else []
    if args.ckpt_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, filename="epoch{epoch}",
                                                             auto_insert_metric_name=False, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=args.epochs, callbacks=callbacks, logger=False,
                        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=not args.quiet,
                        enable_model_summary=False, use_distributed_sampler=False)  # data is split already
    trainer.fit(model, ckpt_path=args.resume)
    if args.out:
        callbacks[0].dump(model, trainer, Path(args.out))
    if trainer.is_global_zero and not args.quiet:
        print(f"loss after {trainer.global_step} steps: {float(trainer.callback_metrics['loss']):.4f}")


if __name__ == "__main__":
    main()

"""The trainer: build, restore, one training step, optimizer step, evaluate, save — each on one screen.

Who owns what (one owner per concern):

- process group, device, DDP, ``no_sync``: plain ``torch.distributed`` (:mod:`launch.distributed`).
  The head is sharded: DDP wraps the backbone only, clipping counts every shard once
  (:func:`partialfc.clip_grad_norm_`) and checkpoints are per-rank files that re-shard
  (:mod:`launch.checkpoint`) — Accelerate's ``prepare``, ``clip_grad_norm_`` and ``save_state``
  assume replicated parameters, so using them for half of these gave two sources of truth.
  ``accelerate launch`` still works: it is only a launcher that sets the same environment as torchrun.
- precision: ``torch.autocast`` + ``torch.amp.GradScaler`` (:class:`Precision`), nothing else.

One step (:meth:`Trainer.train_step` for each micro-batch, then :meth:`Trainer.optimizer_step`)::

    images (B_r, C, H, W) --backbone (DDP)--> embeddings (B_r, d) --PartialFC--> loss, HeadStats
    loss / accum --backward--> backbone grads (DDP all-reduce) + head shard grads
    unscale -> clip over backbone + all shards -> optimizer steps (skipped alike on every rank
    when fp16 overflows) -> LR schedule
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from partialfc import HeadStats, PartialFC, SparseSGD, clip_grad_norm_, margin_from_config

from launch.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from launch.config import TrainConfig
from launch.distributed import barrier, setup_distributed

log = logging.getLogger("launch.train")


def lr_factor(step: int, total: int, optim_cfg) -> float:
    """Linear warm-up, then polynomial / cosine decay to 0, or constant."""
    if step < optim_cfg.warmup_steps:
        return (step + 1) / optim_cfg.warmup_steps
    span = max(1, total - optim_cfg.warmup_steps)
    progress = min(1.0, (step - optim_cfg.warmup_steps) / span)
    if optim_cfg.schedule == "poly":
        return (1.0 - progress) ** optim_cfg.poly_power
    if optim_cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_optimizers(cfg: TrainConfig, backbone, head):
    """``(backbone optimizer, head optimizer)``; the head's may be SparseSGD for sparse row gradients."""
    o = cfg.optim
    head_lr = o.head_lr if o.head_lr is not None else o.lr
    if o.optimizer == "sgd":
        opt_b = torch.optim.SGD(backbone.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt_b = torch.optim.AdamW(backbone.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    if o.head_optimizer == "sparse_sgd":
        opt_h = SparseSGD(head.parameters(), lr=head_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    elif cfg.head.sparse_grad:
        raise ValueError("head.sparse_grad=true needs optim.head_optimizer=sparse_sgd "
                         "(dense optimizers cannot consume sparse row gradients)")
    elif o.optimizer == "sgd":
        opt_h = torch.optim.SGD(head.parameters(), lr=head_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt_h = torch.optim.AdamW(head.parameters(), lr=head_lr, weight_decay=o.weight_decay)
    return opt_b, opt_h


class Precision:
    """autocast dtype and the fp16 GradScaler: the one place that knows the precision."""

    def __init__(self, name: str, device: torch.device):
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def skip(self, device) -> None:
        """An overflowing step: lower the scale, as every rank does alike."""
        self.scaler.scale(torch.ones((), device=device))  # creates the scale if no loss was scaled yet
        self.scaler.update(self.scaler.get_scale() * 0.5)


@dataclass
class StepResult:
    """What one micro-batch produced: the loss (device scalar) and the head's statistics."""
    loss: torch.Tensor
    stats: Optional[HeadStats]
    finite: bool = True
    global_batch: int = 0  # all ranks' samples; from ``stats`` when the head ran


def pick_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def wrap_backbone(backbone: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The replicated backbone on ``device``, in DDP when there are several ranks."""
    backbone = backbone.to(device)
    if world == 1:
        return backbone
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None)


def set_threads(cfg: TrainConfig, world: int) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    elif not torch.cuda.is_available() and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))


def build_head(cfg, num_classes: int, group=None, device=None) -> PartialFC:
    """The run's head from its config (``cfg.model.embedding_size`` and the ``head:`` section): the
    one place the trainer, the evaluation and the checkpoint tools build it."""
    h = cfg.head
    return PartialFC(cfg.model.embedding_size, num_classes, margin=margin_from_config(h),
                     sample_rate=h.sample_rate, chunk_size=h.chunk_size, sparse_grad=h.sparse_grad, seed=h.seed,
                     sub_centers=h.sub_centers, grad_filter=h.grad_filter, grad_filter_block=h.grad_filter_block,
                     group=group, device=device)


class Trainer:
    """One training job. ``Trainer(cfg).fit()`` runs it; the parts are separate methods."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, local_rank = setup_distributed()
        self.out = Path(cfg.train.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        _setup_logging(self.out, self.rank)
        set_threads(cfg, self.world)
        torch.manual_seed(cfg.train.seed * 1000 + self.rank)  # augmentation draws differ per rank
        self.aug_generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.rank)  # batch augmentation
        self.device = pick_device(local_rank)
        self.data = self._load_data()
        self._build_model()
        self._build_loop()
        self.step, self.epoch, self.history, self.snapshots = 0, 0, [], {}
        self.stop_requested = False

    # build ---------------------------------------------------------------------------------
    def _load_data(self):
        from launch.data import build_run_data
        if self.rank == 0:  # prepare (download / render / cache) once, then everyone loads it
            data = build_run_data(self.cfg.data, seed=self.cfg.train.seed)
        barrier()
        if self.rank != 0:
            data = build_run_data(self.cfg.data, seed=self.cfg.train.seed)
        log.info("data: %d training samples, %d classes; world %d; device %s", len(data.train), data.num_classes,
                 self.world, self.device)
        return data

    def _build_model(self) -> None:
        from launch.models import build_backbone
        cfg = self.cfg
        self.backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.data.in_channels,
                                       cfg.data.image_size, dropout=cfg.model.dropout)
        if cfg.model.channels_last:  # before the optimizers see the parameters (a layout change, same values)
            self.backbone.to(memory_format=torch.channels_last)
        self.head = build_head(cfg, self.data.num_classes, device=self.device)
        self.opt_b, self.opt_h = build_optimizers(cfg, self.backbone, self.head)
        self.model = wrap_backbone(self.backbone, self.device, self.world)

    def _build_loop(self) -> None:
        from launch.data import ShardedSampler
        cfg = self.cfg
        self.accum = cfg.optim.grad_accum
        self.sampler = ShardedSampler(len(self.data.train), num_replicas=self.world, rank=self.rank,
                                      batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                      drop_last=self.accum > 1)
        self.loader = DataLoader(self.data.train, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                 num_workers=cfg.data.num_workers, drop_last=False)
        steps_per_epoch = max(1, len(self.data.train) // (cfg.train.batch_size * self.world * self.accum))
        self.total_steps = cfg.train.steps or steps_per_epoch * cfg.train.epochs
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, self.total_steps, cfg.optim))
                           for o in (self.opt_b, self.opt_h)]
        self.precision = Precision(cfg.train.precision, self.device)

    # restore / save ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Resume from ``train.resume`` if there is one: ``auto`` takes the newest intact checkpoint
        (a corrupt one is skipped with a warning on every rank); a named one must be intact."""
        path = resolve_resume(self.out / "checkpoints", self.cfg.train.resume, head=self.head)
        if path is not None:
            state = load_checkpoint(path, backbone=self.backbone, head=self.head, backbone_optimizer=self.opt_b,
                                    head_optimizer=self.opt_h)
            for sch, s in zip(self.schedulers, state["schedulers"]):
                sch.load_state_dict(s)
            self.precision.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            self.step, self.epoch, self.history = state["step"], state["epoch"], state["history"]
            self.snapshots = {int(k): v for k, v in state.get("theta_snapshots", {}).items()}
            log.info("resumed from %s at step %d%s", path, self.step,
                     f" (re-sharded from {state['resharded_from']} ranks)" if state["resharded_from"] else "")
        if self.rank == 0:
            self.cfg.save_yaml(self.out / "config.yaml")

    def save(self) -> None:
        """A checkpoint of the current step (collective: every rank calls it)."""
        trainer_state = {"step": self.step, "epoch": self.epoch, "history": self.history,
                         "schedulers": [s.state_dict() for s in self.schedulers],
                         "scaler": self.precision.scaler.state_dict(), "sampler": self.sampler.state_dict(),
                         "theta_snapshots": self.snapshots}
        where = save_checkpoint(self.out / "checkpoints", self.step, backbone=self.backbone, head=self.head,
                                backbone_optimizer=self.opt_b, head_optimizer=self.opt_h,
                                trainer_state=trainer_state, config=self.cfg.to_dict())
        log.info("checkpoint %s", where)

    # one step -------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> StepResult:
        """Forward and backward of one micro-batch; gradients accumulate (DDP syncs when ``sync``)."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.data.batch_transform is not None:  # augmentation of the whole batch, on the device
            images = self.data.batch_transform(images, generator=self.aug_generator)
        if self.cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = getattr(self.model, "no_sync", None)
        with (no_sync() if no_sync is not None and not sync else contextlib.nullcontext()):
            with self.precision.autocast():
                embeddings = self.model(images)  # (B_local, d)
            if self.precision.scaler.is_enabled():
                finite, global_batch = self._finite_and_batch(embeddings)
                if not finite:  # fp16 overflow in the backbone: skip the step on every rank alike
                    return StepResult(loss=torch.tensor(float("nan")), stats=None, finite=False,
                                      global_batch=global_batch)
            with self.precision.autocast():
                loss, stats = self.head(embeddings, labels, return_stats=True)  # global mean over all ranks
            self.precision.scaler.scale(loss / self.accum).backward()
        return StepResult(loss=loss.detach(), stats=stats)

    def _finite_and_batch(self, embeddings: torch.Tensor) -> tuple[bool, int]:
        """fp16 only: whether every rank's embeddings are finite, and the global batch size (one
        all-reduce of two numbers), so that all ranks skip a step alike."""
        t = torch.tensor([int(not bool(torch.isfinite(embeddings).all())), embeddings.shape[0]],
                         dtype=torch.int64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        bad, batch = t.tolist()
        return bad == 0, batch

    def optimizer_step(self, finite: bool = True) -> torch.Tensor:
        """Unscale, clip over backbone + all head shards, step (or skip alike on every rank); the
        global gradient norm before clipping."""
        scaler = self.precision.scaler
        if not finite:  # fp16 overflow in the forward: no gradients were formed
            self.precision.skip(self.device)
            grad_norm = torch.tensor(float("inf"))
        else:
            scaler.unscale_(self.opt_b)
            scaler.unscale_(self.opt_h)
            max_norm = self.cfg.optim.clip_grad_norm or float("inf")
            grad_norm = clip_grad_norm_(self.backbone.parameters(), self.head.parameters(), max_norm)
            if scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
                self.precision.skip(self.device)  # the norm is global: every rank skips alike
            else:
                scaler.step(self.opt_b)
                scaler.step(self.opt_h)
                scaler.update()
        for sch in self.schedulers:
            sch.step()
        self.opt_b.zero_grad(set_to_none=True)
        self.opt_h.zero_grad(set_to_none=True)
        return grad_norm

    def evaluate(self) -> Optional[dict]:
        """Rank 0 evaluates on the held-out identities (the others wait); appended to the history."""
        result = None
        if self.rank == 0 and self.data.heldout is not None:
            from launch.evaluate import evaluate_heldout
            result = evaluate_heldout(self.backbone, self.data.heldout, self.cfg, self.device)
            self.history.append({"step": self.step, **{f"eval_{k}": v for k, v in result.items()
                                                       if isinstance(v, float) and not k.endswith("_std")}})
            log.info("eval at step %d: %s", self.step, json.dumps(result))
        barrier()
        self.model.train()
        return result

    def fit(self) -> dict:
        """Restore, run the loop to ``total_steps``, evaluate, save; the summary."""
        from launch.loop import run_loop
        self.restore()
        run_loop(self)
        if self.stop_requested and self.step < self.total_steps:  # preempted: the checkpoint is written
            log.warning("stopped at step %d of %d after SIGTERM", self.step, self.total_steps)
            return {"step": self.step, "eval": None, "history": self.history, "preempted": True}
        summary = self.evaluate()
        self.save()
        if self.rank == 0:
            from launch.outputs import write_outputs
            write_outputs(self.out, self.history, self.snapshots, self.cfg, summary)
        barrier()
        return {"step": self.step, "eval": summary, "history": self.history}


def _setup_logging(out: Path, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(out / f"train_rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s")

"""Train a backbone with the sharded PartialFC head.

    torchrun --nproc_per_node=2 -m launch.train --config configs/glyphs_cpu.yaml [--section.key value ...]
    accelerate launch --num_processes 2 -m launch.train --config configs/glyphs_cpu.yaml
    python -m launch.train --config configs/glyphs_cpu.yaml            # one process, no group

Multi-node: ``torchrun --nnodes=N --node_rank=i --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT ...``;
the checkpoint folder must be on a file system every node sees.

The backbone is replicated: Accelerate wraps it in DDP and places it on the device. The head is
sharded over the same ranks and is deliberately NOT wrapped in DDP (there is nothing to average:
each rank owns different rows). ``PartialFC`` returns the global-batch mean loss and scales the
embedding gradient by the world size, so DDP's averaging hands the backbone the exact gradient.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from partialfc import CombinedMargin, PartialFC, SparseSGD, clip_grad_norm_

from launch.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from launch.config import TrainConfig, load_config
from launch.datasets import RunData, build_run_data
from launch.distributed import barrier, setup_distributed, teardown

log = logging.getLogger("launch.train")


def build_margin(head_cfg) -> CombinedMargin:
    extra = dict(extension=head_cfg.extension, straight_through=head_cfg.straight_through)
    if head_cfg.margin == "softmax":
        return CombinedMargin(s=head_cfg.s, m1=1.0, m2=0.0, m3=0.0, **extra)
    if head_cfg.margin == "arcface":
        return CombinedMargin(s=head_cfg.s, m1=1.0, m2=head_cfg.m2, m3=0.0, **extra)
    if head_cfg.margin == "cosface":
        return CombinedMargin(s=head_cfg.s, m1=1.0, m2=0.0, m3=head_cfg.m3, **extra)
    if head_cfg.margin == "sphereface":
        return CombinedMargin(s=head_cfg.s, m1=head_cfg.m1, m2=0.0, m3=0.0, **extra)
    return CombinedMargin(s=head_cfg.s, m1=head_cfg.m1, m2=head_cfg.m2, m3=head_cfg.m3, **extra)


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


def _setup_logging(out: Path, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(out / f"train_rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s")


def _fault_injection(step: int, rank: int) -> None:
    """Testing hook: PARTIALFC_KILL_AT_STEP=N kills rank PARTIALFC_KILL_RANK (default 1) at step N
    on the first attempt of a torchrun job, to exercise ``--max-restarts`` recovery."""
    at = os.environ.get("PARTIALFC_KILL_AT_STEP")
    if at is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if step == int(at) and rank == int(os.environ.get("PARTIALFC_KILL_RANK", "1")):
        log.info("fault injection: killing rank %d at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the final summary (rank 0's evaluation, steps, timings)."""
    from accelerate import Accelerator
    from launch.data import ShardedSampler
    from launch.models import build_backbone

    rank, world, _ = setup_distributed()
    out = Path(cfg.train.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    _setup_logging(out, rank)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    elif not torch.cuda.is_available() and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # augmentation draws differ per rank

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    if rank == 0:  # prepare (download / render / cache) data once, then everyone loads it
        data = build_run_data(cfg.data, seed=cfg.train.seed)
    barrier()
    if rank != 0:
        data = build_run_data(cfg.data, seed=cfg.train.seed)
    log.info("data: %d training samples, %d classes; world %d; device %s", len(data.train), data.num_classes,
             world, device)

    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.data.in_channels,
                              cfg.data.image_size, dropout=cfg.model.dropout)
    head = PartialFC(cfg.model.embedding_size, data.num_classes, margin=build_margin(cfg.head),
                     sample_rate=cfg.head.sample_rate, chunk_size=cfg.head.chunk_size,
                     sparse_grad=cfg.head.sparse_grad, seed=cfg.head.seed, device=device)
    opt_b, opt_h = build_optimizers(cfg, backbone, head)
    model = accelerator.prepare(backbone)  # DDP + device placement for the replicated backbone only
    unwrapped = accelerator.unwrap_model(model)

    accum = cfg.optim.grad_accum
    sampler = ShardedSampler(len(data.train), num_replicas=world, rank=rank, batch_size=cfg.train.batch_size,
                             shuffle=True, seed=cfg.train.seed, drop_last=accum > 1)
    loader = DataLoader(data.train, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, drop_last=False)
    global_batch = cfg.train.batch_size * world
    steps_per_epoch = max(1, len(data.train) // (global_batch * accum))
    total_steps = cfg.train.steps or steps_per_epoch * cfg.train.epochs
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total_steps, cfg.optim))
                  for o in (opt_b, opt_h)]
    precision = cfg.train.precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, epoch, history, snapshots = 0, 0, [], {}
    ckpt_root = out / "checkpoints"
    resume = cfg.train.resume
    path = latest_checkpoint(ckpt_root) if resume == "auto" else (Path(resume) if resume else None)
    if path is not None:
        state = load_checkpoint(path, backbone=unwrapped, head=head, backbone_optimizer=opt_b,
                                head_optimizer=opt_h)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        step, epoch, history = state["step"], state["epoch"], state["history"]
        snapshots = {int(k): v for k, v in state.get("theta_snapshots", {}).items()}
        log.info("resumed from %s at step %d%s", path, step,
                 f" (re-sharded from {state['resharded_from']} ranks)" if state["resharded_from"] else "")
    if rank == 0:
        cfg.save_yaml(out / "config.yaml")

    def checkpoint(at_step: int) -> None:
        trainer_state = {"step": at_step, "epoch": epoch, "history": history,
                         "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(),
                         "sampler": sampler.state_dict(), "theta_snapshots": snapshots}
        where = save_checkpoint(ckpt_root, at_step, backbone=unwrapped, head=head, backbone_optimizer=opt_b,
                                head_optimizer=opt_h, trainer_state=trainer_state, config=cfg.to_dict())
        log.info("checkpoint %s", where)

    snapshot_steps = {int(total_steps * f) for f in (0.0, 0.25, 0.5, 1.0)} | {total_steps - 1}
    writer = None
    if rank == 0 and cfg.train.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                               "pip install 'partialfc[tensorboard]'") from e
        writer = SummaryWriter(str(out / "tensorboard"))
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    t_last, samples_since = time.perf_counter(), 0
    micro = 0
    while step < total_steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sync_now = (micro + 1) % accum == 0
            ctx = accelerator.no_sync(model) if not sync_now else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    embeddings = model(images)  # (B_local, d)
                    loss = head(embeddings, labels)  # global mean over all ranks' samples
                scaler.scale(loss / accum).backward()
            micro += 1
            b_global = int(head.last_stats["valid"].numel())
            sampler.advance(b_global)
            samples_since += b_global
            if not sync_now:
                continue
            scaler.unscale_(opt_b)
            scaler.unscale_(opt_h)
            max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm else float("inf")
            grad_norm = clip_grad_norm_(unwrapped.parameters(), head.parameters(), max_norm)
            if scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
                # skip on every rank alike (the norm is global), lower the scale
                scaler.update(scaler.get_scale() * 0.5)
            else:
                scaler.step(opt_b)
                scaler.step(opt_h)
                scaler.update()
            for sch in schedulers:
                sch.step()
            opt_b.zero_grad(set_to_none=True)
            opt_h.zero_grad(set_to_none=True)
            _fault_injection(step, rank)
            if step in snapshot_steps and rank == 0:
                valid = head.last_stats["valid"]
                cos = head.last_stats["target_cos"][valid].clamp(-1, 1)
                snapshots[step] = torch.acos(cos).float().cpu()
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                correct = (head.last_stats["target_logit"] >= head.last_stats["max_logit"])[head.last_stats["valid"]]
                rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                       "train_acc": float(correct.float().mean()) if correct.numel() else float("nan"),
                       "lr": schedulers[0].get_last_lr()[0], "grad_norm": float(grad_norm),
                       "samples_per_s": samples_since / max(now - t_last, 1e-9)}
                t_last, samples_since = now, 0
                history.append(rec)
                if progress is not None:
                    progress.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_acc']:.2f}",
                                         lr=f"{rec['lr']:.3g}", sps=f"{rec['samples_per_s']:.0f}")
                log.info(json.dumps(rec))
                if writer is not None:
                    for key in ("loss", "train_acc", "lr", "grad_norm", "samples_per_s"):
                        writer.add_scalar(f"train/{key}", rec[key], step)
            if progress is not None:
                progress.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                _evaluate_into(history, step, cfg, unwrapped, data, device, rank)
                model.train()
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < total_steps:
                checkpoint(step)
            if step >= total_steps:
                break
        else:  # the epoch ran out before the last step
            if micro == 0:
                raise ValueError(f"the training set ({len(data.train)} samples) yields no batch of "
                                 f"{cfg.train.batch_size} x {world} ranks")
            epoch += 1
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    summary = _evaluate_into(history, step, cfg, unwrapped, data, device, rank)
    checkpoint(step)
    if rank == 0:
        _write_outputs(out, history, snapshots, cfg, summary)
    barrier()
    return {"step": step, "eval": summary, "history": history}


def _evaluate_into(history, step, cfg, backbone, data: RunData, device, rank) -> Optional[dict]:
    """Rank 0 evaluates on the held-out identities (the others wait); appends to ``history``."""
    result = None
    if rank == 0 and data.heldout is not None:
        from launch.evaluate import evaluate_heldout
        result = evaluate_heldout(backbone, data.heldout, cfg, device)
        history.append({"step": step, **{f"eval_{k}": v for k, v in result.items()
                                         if isinstance(v, float) and not k.endswith("_std")}})
        log.info("eval at step %d: %s", step, json.dumps(result))
    barrier()
    return result


def _write_outputs(out: Path, history, snapshots, cfg: TrainConfig, summary) -> None:
    from launch.plots import plot_curves, plot_margin_curves, plot_theta_distributions
    with open(out / "history.json", "w") as f:
        json.dump({"history": history, "final_eval": summary}, f, indent=1)
    plot_curves(history, out / "curves.png")
    if snapshots:
        plot_theta_distributions({k: v.numpy() for k, v in sorted(snapshots.items())}, out / "theta.png")
    configured = build_margin(cfg.head)
    curves = {}
    for name, m in [("softmax", CombinedMargin.softmax()), ("ArcFace m=0.5", CombinedMargin.arcface()),
                    ("CosFace m=0.35", CombinedMargin.cosface(m=0.35)),
                    ("SphereFace m=1.7", CombinedMargin.sphereface(m=1.7)),
                    (f"configured ({cfg.head.margin})", configured)]:
        curves[name] = (lambda mm: lambda t: mm.psi(torch.cos(torch.as_tensor(t))).numpy())(m)
    plot_margin_curves(curves, out / "margins.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (configs/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    try:
        summary = train(cfg)
    finally:
        teardown()
    if summary["eval"]:
        print(json.dumps({"step": summary["step"], **summary["eval"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

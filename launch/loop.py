"""The training loop around :class:`launch.trainer.Trainer`: epochs, cadence, progress, preemption.

What happens in one step lives in the trainer (``train_step`` per micro-batch, ``optimizer_step``);
this module decides *when*: which batches, when to log, evaluate, checkpoint, stop.

Faults handled here:
- a resumed epoch whose remaining samples form no step (a checkpoint at an epoch end, or a job
  resumed on fewer ranks) moves on to the next epoch; only a *fresh* epoch without a batch is an error;
- SIGTERM (preemption by SLURM / Kubernetes): the current step finishes, every rank learns of it
  through one tiny all-reduce per step, one checkpoint is written, and the loop stops.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time


from launch.distributed import any_rank

log = logging.getLogger("launch.train")


class Cadence:
    """Logging, progress bar, TensorBoard and θ snapshots of a run (rank 0 shows, every rank logs)."""

    def __init__(self, trainer):
        self.t, cfg = trainer, trainer.cfg
        total = trainer.total_steps
        self.snapshot_steps = {int(total * f) for f in (0.0, 0.25, 0.5, 1.0)} | {total - 1}
        self.writer = self.progress = None
        if trainer.rank == 0 and cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                                   "pip install 'partialfc[tensorboard]'") from e
            self.writer = SummaryWriter(str(trainer.out / "tensorboard"))
        if trainer.rank == 0:
            from tqdm import tqdm
            self.progress = tqdm(total=total, initial=trainer.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.t_last, self.samples_since, self.skipped = time.perf_counter(), 0, 0

    def snapshot(self, step: int, stats) -> None:
        if step in self.snapshot_steps and self.t.rank == 0 and stats is not None:
            self.t.snapshots[step] = stats.target_angles().float().cpu()

    def record(self, loss, stats, grad_norm) -> None:
        t, cfg = self.t, self.t.cfg
        if not (t.step % cfg.train.log_every == 0 or t.step == t.total_steps):
            return
        now = time.perf_counter()
        rec = {"step": t.step, "epoch": t.epoch, "loss": float(loss),
               "train_acc": float(stats.accuracy()) if stats is not None else float("nan"),
               "lr": t.schedulers[0].get_last_lr()[0], "grad_norm": float(grad_norm),
               "samples_per_s": self.samples_since / max(now - self.t_last, 1e-9)}
        if self.skipped:
            rec["skipped_steps"] = self.skipped
        if stats is not None and stats.grad_filter is not None and stats.grad_filter.ready:
            rec["grad_filter_skipped"] = stats.grad_filter.skipped_fraction  # this rank's class blocks
        self.t_last, self.samples_since = now, 0
        t.history.append(rec)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_acc']:.2f}",
                                      lr=f"{rec['lr']:.3g}", sps=f"{rec['samples_per_s']:.0f}")
        log.info(json.dumps(rec))
        if self.writer is not None:
            for key in ("loss", "train_acc", "lr", "grad_norm", "samples_per_s", "grad_filter_skipped"):
                if key in rec:
                    self.writer.add_scalar(f"train/{key}", rec[key], t.step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()


def _fault_injection(step: int, rank: int) -> None:
    """Testing hook: PARTIALFC_KILL_AT_STEP=N kills rank PARTIALFC_KILL_RANK (default 1) at step N
    on the first attempt of a torchrun job, to exercise ``--max-restarts`` recovery."""
    at = os.environ.get("PARTIALFC_KILL_AT_STEP")
    if at is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if step == int(at) and rank == int(os.environ.get("PARTIALFC_KILL_RANK", "1")):
        log.info("fault injection: killing rank %d at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _epoch_has_a_step(trainer) -> bool:
    """Whether the sampler's remaining samples of this epoch form at least one global step (the
    same answer on every rank: it depends only on global counts)."""
    return trainer.sampler.steps_left() > 0


def _install_sigterm(trainer):
    def on_term(signum, frame):
        trainer.stop_requested = True
        log.warning("SIGTERM: finishing the current step, then writing a checkpoint")
    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        return None


def _after_step(trainer, cadence, result, grad_norm) -> bool:
    """Cadence after one optimizer step; True when the loop must stop now (preempted)."""
    t, cfg = trainer, trainer.cfg
    _fault_injection(t.step, t.rank)
    cadence.snapshot(t.step, result.stats)
    t.step += 1
    cadence.record(result.loss, result.stats, grad_norm)
    if cadence.progress is not None:
        cadence.progress.update(1)
    if cfg.train.eval_every and t.step % cfg.train.eval_every == 0 and t.step < t.total_steps:
        t.evaluate()
    if cfg.train.ckpt_every and t.step % cfg.train.ckpt_every == 0 and t.step < t.total_steps:
        t.save()
    if any_rank(t.stop_requested, t.device):
        t.stop_requested = True
        if t.step < t.total_steps:
            t.save()
        return True
    return False


def run_loop(trainer) -> None:
    """Steps until ``total_steps`` (or a SIGTERM); each step = ``accum`` micro-batches."""
    t = trainer
    cadence, previous = Cadence(t), _install_sigterm(t)
    t.model.train()
    micro, finite = 0, True
    try:
        while t.step < t.total_steps:
            t.sampler.set_epoch(t.epoch)
            if not _epoch_has_a_step(t):
                if t.sampler.consumed == 0:
                    raise ValueError(f"the training set ({len(t.data.train)} samples) yields no batch of "
                                     f"{t.cfg.train.batch_size} x {t.world} ranks")
                t.epoch += 1  # resumed at the end of an epoch: nothing left in it
                continue
            for images, labels in t.loader:
                sync = (micro + 1) % t.accum == 0
                result = t.train_step(images, labels, sync)
                micro += 1
                finite = finite and result.finite
                b_global = result.stats.global_batch if result.stats is not None else result.global_batch
                t.sampler.advance(b_global)
                cadence.samples_since += b_global
                if not sync:
                    continue
                cadence.skipped += 0 if finite else 1
                grad_norm = t.optimizer_step(finite)
                finite = True
                if _after_step(t, cadence, result, grad_norm) or t.step >= t.total_steps:
                    return
            t.epoch += 1
    finally:
        cadence.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

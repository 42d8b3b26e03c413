"""The training app under faults: a checkpoint at an epoch end, preemption by SIGTERM, fp16 overflow.

Each test pins a fault of the app as it was: resuming from a checkpoint written at an epoch boundary
died with "the training set (320 samples) yields no batch of 16 x 2 ranks"; SIGTERM was ignored, so
everything since the last periodic checkpoint was lost; an fp16 overflow in the backbone gave
non-finite embeddings that the head rejected with an uncaught ValueError, ending the job.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.dist_utils import run_distributed
from tests.test_train_e2e import CONFIG, ENV, ROOT, losses, resume_from, torchrun


def test_resume_from_a_checkpoint_at_an_epoch_end(tmp_path):
    """320 samples, 16 x 2 ranks: 10 steps per epoch; the checkpoint at step 10 sits at the epoch's end."""
    base = tmp_path / "base"
    torchrun(2, base, "--train.steps", "14", "--train.ckpt_every", "10")
    resumed = tmp_path / "resumed"
    resume_from(base, resumed, 10)
    torchrun(2, resumed, "--train.steps", "14", "--train.ckpt_every", "10")
    got, want = losses(resumed), losses(base)
    assert sorted(got) == list(range(1, 15))  # the history up to step 10 comes with the checkpoint
    assert all(got[s] == want[s] for s in range(11, 15)), (got, want)


def _wait_for_step(log: Path, step: int, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and f'"step": {step},' in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigterm_writes_one_checkpoint_and_the_restart_loses_nothing(tmp_path):
    """SIGTERM to the whole job (agent and workers, as a cluster does): every rank finishes its step,
    one checkpoint is written, the job exits within the grace period, and the restart continues with
    exactly the losses of an uninterrupted run."""
    steps = "60"
    base = tmp_path / "base"
    torchrun(2, base, "--train.steps", steps, "--train.ckpt_every", "1000")
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "launch.train", "--config", str(CONFIG), "--output_dir", str(out), "--log_every", "1",
           "--train.steps", steps, "--train.ckpt_every", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(out / "train_rank0.log", 5, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.time()
        proc.communicate(timeout=60)
        assert time.time() - sent < 30  # well inside a usual grace period
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    written = sorted((out / "checkpoints").iterdir())
    assert len(written) == 1 and not written[0].name.endswith(".tmp"), written
    stopped_at = int(written[0].name.split("_")[1])
    assert 5 <= stopped_at < 60
    torchrun(2, out, "--train.steps", steps, "--train.ckpt_every", "1000")
    got, want = losses(out), losses(base)
    assert sorted(got) == list(range(1, 61))
    assert all(got[s] == want[s] for s in range(stopped_at + 1, 61))


def _fp16_overflow(rank, world, out_dir):
    """Rank ``world - 1`` overflows at the first step; returns what each rank saw."""
    from launch.config import load_config
    from launch.trainer import Trainer

    cfg = load_config(str(CONFIG), ["--train.precision", "fp16", "--output_dir", out_dir, "--train.steps", "3"])
    trainer = Trainer(cfg)
    forward, calls = trainer.backbone.forward, []

    def overflowing(x):
        y = forward(x)
        calls.append(1)
        return y * float("inf") if rank == world - 1 and len(calls) == 1 else y

    trainer.backbone.forward = overflowing
    before = [p.detach().clone() for p in trainer.backbone.parameters()] + [trainer.head.weight.detach().clone()]
    scale = trainer.precision.scaler.get_scale()
    images, labels = next(iter(trainer.loader))
    result = trainer.train_step(images, labels, sync=True)
    trainer.optimizer_step(result.finite)
    after = [p.detach() for p in trainer.backbone.parameters()] + [trainer.head.weight.detach()]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    result2 = trainer.train_step(*next(iter(trainer.loader)), sync=True)  # the next step trains again
    trainer.optimizer_step(result2.finite)
    return result.finite, unchanged, trainer.precision.scaler.get_scale() < scale, result2.finite


def test_fp16_overflow_in_the_backbone_skips_the_step_on_every_rank(tmp_path):
    for finite, unchanged, scale_lowered, next_finite in run_distributed(_fp16_overflow, 2, str(tmp_path)):
        assert not finite and unchanged and scale_lowered and next_finite


def _agent(out: Path, port: int, run_id: str, log: Path, steps: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
           "--rdzv_conf=last_call_timeout=5,join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=2", "--monitor_interval=0.5",
           "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(out), "--log_every", "1",
           "--train.steps", steps, "--train.ckpt_every", "10"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_port(port: int, proc, timeout: float = 120.0) -> None:
    """Until something listens on 127.0.0.1:port (the agent that started the c10d rendezvous store)."""
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the first agent exited before it opened the rendezvous store")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_elastic_shrink_to_one_node_finishes_every_step(tmp_path):
    """Two torchrun agents ("nodes", elastic --nnodes=1:2); one node dies (agent and worker killed; the
    agent that hosts the rendezvous store survives, as the node of the rendezvous endpoint does on a cluster).
    The survivor re-rendezvouses with world 1, resumes from the last checkpoint re-sharded from 2 ranks
    and finishes every step — before the fix every restart died with 'yields no batch of 16 x 1 ranks'."""
    out, port = tmp_path / "run", _free_port()
    first = _agent(out, port, "shrink", tmp_path / "a.log", "40")
    _wait_for_port(port, first)  # the survivor hosts the rendezvous store: it must bind the port first
    second = _agent(out, port, "shrink", tmp_path / "b.log", "40")
    try:
        _wait_for_step(out / "train_rank0.log", 12, first, timeout=180)
        _kill_tree(second.pid)  # a lost node: its agent and its worker
        first.wait(timeout=300)
    finally:
        for p in (first, second):
            if p.poll() is None:
                _kill_tree(p.pid)
    log = (tmp_path / "a.log").read_text()
    assert first.returncode == 0, log[-4000:]
    got = losses(out)
    assert max(got) == 40 and "re-sharded from 2 ranks" in (out / "train_rank0.log").read_text()

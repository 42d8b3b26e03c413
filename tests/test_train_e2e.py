"""End to end: torchrun with 2 gloo ranks, checkpoints, exact resume, resume on 3 ranks, a rank killed
under ``torchrun --max-restarts``, evaluation and ONNX export — on the generated smoke data set."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smoke_synthetic.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def run_cmd(cmd, timeout=240, env=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int, out: Path, *extra: str, max_restarts: int = 0, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "launch.train", "--config", str(CONFIG),
           "--output_dir", str(out), "--log_every", "1", *extra]
    proc = run_cmd(cmd, timeout=timeout, env={**ENV, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out: Path) -> dict:
    history = json.loads((out / "history.json").read_text())["history"]
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def resume_from(base: Path, out: Path, step: int) -> None:
    (out / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(base / "checkpoints" / name, out / "checkpoints" / name)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    torchrun(2, out, "--train.batch_size", "12")
    return out


def test_training_outputs(base_run):
    hist = losses(base_run)
    assert sorted(hist) == list(range(1, 13))
    summary = json.loads((base_run / "history.json").read_text())["final_eval"]
    assert 0.5 < summary["verification_acc"] <= 1.0 and 0.0 <= summary["identification_top1"] <= 1.0
    for png in ("curves.png", "theta.png", "margins.png"):
        data = (base_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in sorted((base_run / "checkpoints").iterdir())] == \
        ["step_00000005", "step_00000010", "step_00000012"]
    meta = json.loads((base_run / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["shards"] == [[0, 20], [20, 40]]


def test_resume_same_world_size_is_exact(base_run, tmp_path):
    resume_from(base_run, tmp_path, 5)
    torchrun(2, tmp_path, "--train.batch_size", "12")
    resumed, base = losses(tmp_path), losses(base_run)
    assert all(resumed[s] == base[s] for s in range(6, 13)), (resumed, base)


def test_resume_on_three_ranks(base_run, tmp_path):
    """Saved on 2 ranks, resumed on 3 with the same global batch: the head is re-sharded and the
    loss continues from where it was (BatchNorm sees other per-rank batches, so not bit for bit)."""
    resume_from(base_run, tmp_path, 5)
    proc = torchrun(3, tmp_path, "--train.batch_size", "8")
    assert "re-sharded from 2 ranks" in proc.stderr
    resumed, base = losses(tmp_path), losses(base_run)
    first = base[1]
    for s in range(6, 13):
        assert abs(resumed[s] - base[s]) < 0.15 * first, (s, resumed[s], base[s])
    meta = json.loads((tmp_path / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["world_size"] == 3 and meta["shards"] == [[0, 14], [14, 27], [27, 40]]


def test_killed_rank_restarts_from_last_checkpoint(base_run, tmp_path):
    """torchrun --max-restarts=1; rank 1 is SIGKILLed at step 7 on the first attempt. The restarted job
    resumes from step 5 by itself and ends exactly where the uninterrupted run ended."""
    proc = torchrun(2, tmp_path, "--train.batch_size", "12", max_restarts=1,
                    env={"PARTIALFC_KILL_AT_STEP": "7", "PARTIALFC_KILL_RANK": "1"})
    log = proc.stderr
    assert "fault injection: killing rank 1 at step 7" in (tmp_path / "train_rank1.log").read_text()
    assert "resumed from" in log and "step_00000005" in log
    resumed, base = losses(tmp_path), losses(base_run)
    assert sorted(resumed) == list(range(1, 13))
    assert all(resumed[s] == base[s] for s in range(1, 13))


def test_evaluate_and_export(base_run, tmp_path):
    ckpt = base_run / "checkpoints" / "step_00000012"
    out_json = tmp_path / "eval.json"
    proc = run_cmd([sys.executable, "-m", "launch.evaluate", "--checkpoint", str(ckpt), "--json", str(out_json)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    final = json.loads((base_run / "history.json").read_text())["final_eval"]
    assert result["verification_acc"] == pytest.approx(final["verification_acc"])
    assert "identification_top1" in proc.stdout
    onnx_path = tmp_path / "backbone.onnx"
    proc = run_cmd([sys.executable, "-m", "launch.export", "--checkpoint", str(ckpt), "--output", str(onnx_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert onnx_path.stat().st_size > 10_000

    import numpy as np
    import onnxruntime as ort
    import torch
    from launch.checkpoint import load_backbone
    backbone, cfg = load_backbone(ckpt)
    x = torch.randn(3, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        expected = backbone(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("overrides", [
    ["--train.precision", "bf16", "--optim.grad_accum", "2", "--optim.schedule", "cosine"],
    ["--head.sample_rate", "0.3", "--head.sparse_grad", "true", "--optim.head_optimizer", "sparse_sgd",
     "--head.chunk_size", "8"],
    ["--optim.optimizer", "adamw", "--optim.lr", "0.003", "--head.margin", "sphereface", "--head.m1", "1.7"],
])
def test_single_process_variants(tmp_path, overrides):
    """Plain `python -m launch.train` (no process group) with other precisions, optimizers and heads."""
    cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(tmp_path),
           "--steps", "6", "--ckpt_every", "0", "--log_every", "1", *overrides]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hist = losses(tmp_path)
    assert len(hist) == 6 and all(v == v and v < 100 for v in hist.values())  # finite


def test_config_typo_is_reported(tmp_path):
    proc = run_cmd([sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--optim.lerning_rate", "0.1"])
    assert proc.returncode != 0 and "lerning_rate" in proc.stderr and "lr" in proc.stderr


def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch --multi_gpu` starts torch elastic workers; without GPUs they use gloo on CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "launch.train",
           "--config", str(CONFIG), "--output_dir", str(tmp_path), "--steps", "3", "--log_every", "1"]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 2" in proc.stderr
    assert len(losses(tmp_path)) == 3


def test_channels_last_trains_the_same_model(tmp_path):
    """``model.channels_last``: the backbone really runs in NHWC (its saved conv weights have that
    layout) and training follows the default layout's run (fp32: the same losses to rounding), and
    the checkpoint loads into a default-layout backbone for evaluation and export."""
    import torch
    from launch.checkpoint import _load, latest_checkpoint, load_backbone
    runs = {}
    for layout in ("false", "true"):
        out = tmp_path / layout
        cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(out),
               "--steps", "4", "--ckpt_every", "4", "--log_every", "1", "--model.channels_last", layout]
        proc = run_cmd(cmd)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[layout] = (losses(out), latest_checkpoint(out / "checkpoints"))
    (plain, plain_ckpt), (nhwc, nhwc_ckpt) = runs["false"], runs["true"]
    assert sorted(plain) == sorted(nhwc) == [1, 2, 3, 4]
    for step in plain:
        assert abs(plain[step] - nhwc[step]) <= 1e-4 * abs(plain[step]), (step, plain[step], nhwc[step])
    convs = {k: v for k, v in _load(nhwc_ckpt / "backbone.pt").items() if v.ndim == 4}
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                         for v in convs.values() if v.shape[1] > 1 and v.shape[2:] != (1, 1))
    assert all(_load(plain_ckpt / "backbone.pt")[k].is_contiguous() for k in convs)
    backbone, cfg = load_backbone(nhwc_ckpt)
    x = torch.randn(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    assert backbone(x).shape == (2, cfg.model.embedding_size)


def test_grad_filter_from_the_config_logs_the_skipped_fraction(tmp_path):
    """``head.grad_filter``: the trainer's head filters its backward and the history records the
    skipped fraction of the class blocks; a huge eps skips every non-target block (the loss still
    falls: target entries are exact), eps 0 skips none; a negative eps is a config error."""
    runs = {}
    for eps in ("0", "1e6"):
        out = tmp_path / eps
        cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(out),
               "--steps", "6", "--ckpt_every", "0", "--log_every", "1", "--head.grad_filter", eps,
               "--head.grad_filter_block", "4"]
        proc = run_cmd(cmd)
        assert proc.returncode == 0, proc.stderr[-4000:]
        history = json.loads((out / "history.json").read_text())["history"]
        runs[eps] = [r["grad_filter_skipped"] for r in history if "loss" in r]
    assert runs["0"] == [0.0] * 6
    assert len(runs["1e6"]) == 6 and all(0.9 <= f <= 1.0 for f in runs["1e6"])
    proc = run_cmd([sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(tmp_path / "bad"),
                    "--head.grad_filter", "-1"])
    assert proc.returncode != 0 and "grad_filter" in proc.stderr


def test_trainer_augments_each_batch_on_its_device(tmp_path):
    """``RunData.batch_transform`` (the glyphs' batched augmentation) runs once per micro-batch on the
    trainer's device, with the trainer's seeded generator, and its output is what the backbone sees."""
    import torch
    from launch.config import load_config
    from launch.trainer import Trainer
    cfg = load_config(str(CONFIG), ["--output_dir", str(tmp_path), "--steps", "1", "--ckpt_every", "0"])
    trainer = Trainer(cfg)
    calls, seen = [], []

    def spy(images, generator=None):
        calls.append((images.device, images.shape, generator))
        return torch.zeros_like(images)

    trainer.data.batch_transform = spy
    trainer.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    images, labels = next(iter(trainer.loader))
    trainer.train_step(images, labels, sync=True)
    assert len(calls) == 1 and calls[0][0] == trainer.device and calls[0][1] == images.shape
    assert calls[0][2] is trainer.aug_generator
    assert len(seen) == 1 and seen[0].abs().max() == 0 and images.abs().max() > 0  # the augmented batch

"""examples/lightning_example.py under Lightning's ``Trainer(strategy="ddp")`` on 2 gloo CPU ranks.

- The whole LightningModule (backbone + head) is wrapped by Lightning's DDP: every step's loss,
  head gradient (this rank's rows), backbone gradient (after DDP's averaging) and the final rows and
  momentum equal those of the plain loop with the head outside DDP (as in examples/ddp_example.py).
- Lightning writes checkpoints from rank 0 only. With the example's consolidation hooks the file
  holds every class's rows and momentum, and resuming (under torchrun this time) restores every
  rank's rows and momentum bit for bit and continues exactly like the uninterrupted run.
- Without them, rank 0's file holds rank 0's rows only, and resuming fails on rank 1 with the
  library's ValueError instead of training on rank 0's rows.

The example runs as a subprocess in its own session, killed as a group on timeout. Rank 1 is started
by Lightning itself (``python examples/lightning_example.py``) or by torchrun.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from tests.test_train_e2e import run_cmd as e2e_run_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_example.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TIMEOUT_S = 150
CLASSES, BATCHES, EPOCHS = 51, 6, 2  # 51 classes: uneven shards [0, 26) and [26, 51)


def run_cmd(cmd, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    """tests.test_train_e2e's runner (own session, killed as a group on timeout) with this file's env."""
    return e2e_run_cmd(cmd, timeout=timeout, env=ENV)


def example(*args, torchrun=False, check=True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = run_cmd([*launcher, str(EXAMPLE), "--quiet", *map(str, args)])
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs, a checkpoint at the end of each, every step recorded (Lightning launches rank 1)."""
    base = tmp_path_factory.mktemp("lightning")
    example("--epochs", EPOCHS, "--batches", BATCHES, "--num-classes", CLASSES,
            "--ckpt-dir", base / "ckpt", "--out", base / "out")
    return base


# --- the reference: the plain loop, head outside DDP (tests/lightning_plain_loop.py, under torchrun) ---
PLAIN_LOOP = ROOT / "tests" / "lightning_plain_loop.py"


def plain_loop(out: Path) -> list[dict]:
    """Both ranks' record of the plain loop. Run under torchrun in its own session like the example
    (it ran in processes spawned by the test before, and hung there in two full-suite runs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(PLAIN_LOOP),
           "--num-classes", str(CLASSES), "--batches", str(BATCHES), "--epochs", str(EPOCHS), "--out", str(out),
           "--stack-dump-after", str(TIMEOUT_S - 15)]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"plain_rank{r}.pt", weights_only=False) for r in range(2)]


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_lightning_ddp_matches_the_plain_loop(trained, tmp_path):
    """Every step's loss, head gradient and backbone gradient on every rank, and the final rows and
    momentum, equal the plain loop's (head outside DDP) for the same seeds and data."""
    lit = load_ranks(trained / "out")
    ref = plain_loop(tmp_path)
    assert [r["class_range"] for r in lit] == [(0, 26), (26, 51)] == [r["class_range"] for r in ref]
    worst = 0.0
    for got, want in zip(lit, ref):
        assert len(got["steps"]) == len(want["steps"]) == BATCHES * EPOCHS
        for g, w in zip(got["steps"], want["steps"]):
            worst = max(worst, _max_diff(g["loss"], w["loss"]), _max_diff(g["head_grad"], w["head_grad"]),
                        *(_max_diff(g["backbone_grads"][n], w["backbone_grads"][n]) for n in w["backbone_grads"]))
        worst = max(worst, _max_diff(got["end"]["head_weight"], want["head_weight"]),
                    _max_diff(got["end"]["head_momentum"], want["head_momentum"]))
    print(f"largest difference from the plain loop: {worst:.3g}")
    assert worst <= 1e-6, worst
    # DDP really ran on different rows: the two ranks' heads differ, their losses agree (global mean)
    assert all(torch.equal(a["loss"], b["loss"]) for a, b in zip(lit[0]["steps"], lit[1]["steps"]))
    losses = [float(s["loss"]) for s in lit[0]["steps"]]
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])


def test_lightning_checkpoint_resume_keeps_every_shard(trained, tmp_path):
    """Rank 0's checkpoint holds all 51 rows and their momentum; resuming it under torchrun gives
    every rank its own rows and momentum bit for bit, and the rest of the run is the uninterrupted one."""
    ckpt = trained / "ckpt" / "epoch0.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"]["head.weight"].shape == (CLASSES, 32)
    head_momentum = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()
                     if s["momentum_buffer"].shape[0] == CLASSES]
    assert len(head_momentum) == 1

    example("--epochs", EPOCHS, "--batches", BATCHES, "--num-classes", CLASSES, "--resume", ckpt,
            "--out", tmp_path / "out", torchrun=True)
    base, resumed = load_ranks(trained / "out"), load_ranks(tmp_path / "out")
    for b, r in zip(base, resumed):
        at_save, start = b["saved"][0], r["start"]
        assert at_save["step"] == start["step"] == BATCHES
        assert torch.equal(start["head_weight"], at_save["head_weight"])
        assert torch.equal(start["head_momentum"], at_save["head_momentum"])
        assert start["head_step"] == at_save["head_step"] == BATCHES
        assert all(torch.equal(start["backbone"][k], v) for k, v in at_save["backbone"].items())
        lo, hi = b["class_range"]
        assert torch.equal(saved["state_dict"]["head.weight"][lo:hi], at_save["head_weight"])
        assert torch.equal(head_momentum[0][lo:hi], at_save["head_momentum"])
        # the second epoch after the resume is the uninterrupted run's second epoch, bit for bit
        assert len(r["steps"]) == BATCHES
        for g, w in zip(r["steps"], b["steps"][BATCHES:]):
            assert torch.equal(g["loss"], w["loss"]) and torch.equal(g["head_grad"], w["head_grad"])
        assert torch.equal(r["end"]["head_weight"], b["end"]["head_weight"])
        assert torch.equal(r["end"]["head_momentum"], b["end"]["head_momentum"])


def test_lightning_checkpoint_without_consolidation_fails_clearly(tmp_path):
    """--no-consolidate: rank 0's file keeps only rank 0's rows; resuming raises the library's
    ValueError on rank 1 (and the job ends) instead of giving rank 1 rank 0's classes."""
    example("--epochs", 1, "--batches", 2, "--num-classes", 11, "--ckpt-dir", tmp_path, "--no-consolidate",
            torchrun=True)
    saved = torch.load(tmp_path / "epoch0.ckpt", weights_only=False)
    assert saved["state_dict"]["head.weight"].shape == (6, 32)  # rank 0's classes [0, 6) of 11
    proc = example("--epochs", 2, "--batches", 2, "--num-classes", 11, "--resume", tmp_path / "epoch0.ckpt",
                   torchrun=True, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ValueError: PartialFC.load_state_dict: the state dict holds classes [0, 6) of 11" in log, log[-4000:]
    assert "this head holds classes [6, 11) of 11 (rank 1 of 2" in log
    assert "other classes' rows" in log


def test_lightning_checkpoint_resumes_on_one_process(trained, tmp_path):
    """The consolidated checkpoint of the 2-rank run resumes in a single process (one head of all 51
    classes): its rows and momentum are both ranks' rows and momentum at save time, in class order."""
    example("--devices", 1, "--epochs", EPOCHS, "--batches", BATCHES, "--num-classes", CLASSES,
            "--resume", trained / "ckpt" / "epoch0.ckpt", "--out", tmp_path / "out")
    one = torch.load(tmp_path / "out" / "rank0.pt", weights_only=False)
    base = load_ranks(trained / "out")
    assert one["world_size"] == 1 and one["class_range"] == (0, CLASSES)
    assert torch.equal(one["start"]["head_weight"], torch.cat([b["saved"][0]["head_weight"] for b in base]))
    assert torch.equal(one["start"]["head_momentum"], torch.cat([b["saved"][0]["head_momentum"] for b in base]))
    assert len(one["steps"]) == BATCHES  # it trains on (the first rank's data of) the second epoch

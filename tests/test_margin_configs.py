"""Every margin kind from a config: the factory builds it, the config validates it, and the trainer
runs a few steps with it (AdaFace and CurricularFace through the same path as the combined margins)."""
import json
import subprocess
import sys

import pytest

from partialfc import AdaFace, CombinedMargin, CurricularFace, margin_from_config
from tests.test_train_e2e import CONFIG, ENV, ROOT


def test_factory_builds_each_kind():
    assert margin_from_config({"margin": "arcface", "s": 30.0, "m2": 0.3}) == CombinedMargin.arcface(s=30.0, m=0.3)
    ada = margin_from_config({"margin": "adaface", "s": 32.0, "m": 0.3, "h": 0.5, "t_alpha": 0.1})
    assert isinstance(ada, AdaFace) and (ada.s, ada.m, ada.h, ada.t_alpha) == (32.0, 0.3, 0.5, 0.1)
    cur = margin_from_config({"margin": "curricularface", "s": 32.0})
    assert isinstance(cur, CurricularFace) and cur.m == 0.5
    with pytest.raises(ValueError, match="margin must be one of"):
        margin_from_config({"margin": "magface"})


def test_config_refuses_bad_new_margin_values():
    from launch.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="AdaFace"):
        load_config(str(CONFIG), ["--head.margin", "adaface", "--head.t_alpha", "3.0"])


@pytest.mark.parametrize("kind", ["adaface", "curricularface"])
def test_trainer_runs_with_the_new_margins(tmp_path, kind):
    cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(tmp_path),
           "--head.margin", kind, "--train.steps", "4", "--train.ckpt_every", "0", "--log_every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 4 and all(l == l for l in losses)  # finite numbers, no NaN


def test_checkpoint_keeps_the_margin_statistics(tmp_path):
    """AdaFace's running statistics travel with the checkpoint and come back on resume."""
    import torch
    from launch.checkpoint import _load, latest_checkpoint
    cmd = [sys.executable, "-m", "launch.train", "--config", str(CONFIG), "--output_dir", str(tmp_path),
           "--head.margin", "adaface", "--head.t_alpha", "0.5", "--train.steps", "3", "--log_every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard = _load(latest_checkpoint(tmp_path / "checkpoints") / "head_rank0.pt")
    mean = shard["margin_state"]["batch_mean"]
    assert mean.dtype == torch.float64 and float(mean) != 20.0  # moved from its initial value

"""``python -m launch.evaluate``: a bad .bin file is reported in one line, the good ones are
still evaluated, and the exit code tells that something failed."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from launch.config import load_config
from launch.data import write_bin
from launch.evaluate import main
from launch.models import build_backbone

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke_synthetic.yaml"


def make_checkpoint(folder: Path, in_channels: int) -> Path:
    """A checkpoint folder as ``launch.checkpoint.load_backbone`` reads it: meta.json + backbone.pt."""
    cfg = load_config(str(CONFIG), ["--data.synthetic_classes", "4", "--data.synthetic_per_class", "4",
                                    "--data.heldout_classes", "5", "--data.in_channels", str(in_channels),
                                    "--model.embedding_size", "8", "--eval.pairs", "40"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, in_channels, cfg.data.image_size)
    folder.mkdir(parents=True)
    torch.save(backbone.state_dict(), folder / "backbone.pt")
    (folder / "meta.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    return folder


def good_bin(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_bin(path, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(40)],
                     [k % 2 == 0 for k in range(20)])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_bin_files_are_named_and_the_good_one_is_evaluated(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "step_00000001", in_channels=3)
    good = good_bin(tmp_path / "good.bin")
    evil, trunc, marker = tmp_path / "evil.bin", tmp_path / "trunc.bin", tmp_path / "pwned"
    evil.write_bytes(pickle.dumps(([b"x", _Evil(marker)], [True]), protocol=2))
    trunc.write_bytes(good.read_bytes()[:300])
    out_json = tmp_path / "eval.json"
    rc = main(["--checkpoint", str(ckpt), "--bin", str(evil), str(good), str(trunc), "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert rc == 1 and not marker.exists()
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 3, err
    assert "evil.bin" in lines[0] and "refusing to load" in lines[0]
    assert "trunc.bin" in lines[1] and "truncated" in lines[1]
    assert "2 .bin file(s) failed" in lines[2] and "evil.bin" in lines[2] and "trunc.bin" in lines[2]
    result = json.loads(out_json.read_text())
    assert 0.0 <= result["good_acc"] <= 1.0 and "verification_acc" in result
    assert not any(k.startswith(("evil", "trunc")) for k in result)
    assert "good_acc" in out and "identification_top1" in out


def test_all_good_exits_zero_and_grey_models_read_bins_in_grey(tmp_path, capsys):
    """A backbone trained on grey images (glyphs: in_channels 1) gets grey .bin images."""
    ckpt = make_checkpoint(tmp_path / "step_00000001", in_channels=1)
    rc = main(["--checkpoint", str(ckpt), "--bin", str(good_bin(tmp_path / "lfw.bin"))])
    out, err = capsys.readouterr()
    assert rc == 0 and "lfw_acc" in out and err == ""

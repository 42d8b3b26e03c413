"""Validation split of training identities (``data.val_classes``) and the quality-table gatherer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launch.config import ConfigError, DataConfig, load_config
from launch.data import build_run_data

N_CHARS, N_DESIGNS, SIZE = 60, 4, 8


def write_cache(cache_dir):
    """A fake jis1 cache: pixel (0, 0) = character index, pixel (0, 1) = design index."""
    rows = [(c, d) for c in range(N_CHARS) for d in range(N_DESIGNS)]
    images = np.zeros((len(rows), SIZE, SIZE), np.uint8)
    for i, (c, d) in enumerate(rows):
        images[i, 0, 0], images[i, 0, 1] = c, d
    np.savez(cache_dir / f"glyphs_jis1_{SIZE}.npz", images=images,
             labels=np.array([r[0] for r in rows]), design=np.array([r[1] for r in rows]),
             chars=np.array([f"k{c}" for c in range(N_CHARS)]), faces=np.array([f"f{d}" for d in range(N_DESIGNS)]))


def char_ids(float_images: torch.Tensor) -> set:
    """Original character indices of float images in [-1, 1] (pixel (0, 0))."""
    return set(torch.round((float_images[:, 0, 0, 0] + 1) * 127.5).long().tolist())


@pytest.fixture()
def glyph_cfg(tmp_path):
    write_cache(tmp_path)

    def make(**kw):
        return DataConfig(dataset="glyphs", cache_dir=str(tmp_path), image_size=SIZE, heldout_classes=10,
                          augment=False, **kw)
    return make


def test_glyph_validation_split_is_disjoint_and_reduces_training(glyph_cfg):
    plain = build_run_data(glyph_cfg(), seed=7)
    data = build_run_data(glyph_cfg(val_classes=12), seed=7)
    assert plain.eval_split == "heldout" and data.eval_split == "val"
    held_chars = char_ids(plain.heldout.images)
    train_all = set(plain.train.glyphs.images[:, 0, 0].tolist())
    train_now = set(data.train.glyphs.images[:, 0, 0].tolist())
    val_chars = char_ids(data.heldout.images)
    assert len(held_chars) == 10 and len(val_chars) == 12 and len(train_all) == N_CHARS - 10
    assert val_chars.isdisjoint(held_chars)              # never the held-out kanji
    assert val_chars <= train_all                        # drawn from the training identities
    assert train_now == train_all - val_chars            # ... and removed from training
    assert data.num_classes == N_CHARS - 10 - 12 == data.train.num_classes
    assert sorted(set(data.train.glyphs.labels.tolist())) == list(range(data.num_classes))
    # the validation set is evaluated like the held-out one: labels 0..V-1, every design present
    assert sorted(set(data.heldout.labels.tolist())) == list(range(12))
    assert len(data.heldout.labels) == 12 * N_DESIGNS
    assert set(data.heldout.groups.tolist()) == set(range(N_DESIGNS))
    for x, lab in zip(data.heldout.images, data.heldout.labels):  # one label per character
        same = data.heldout.images[data.heldout.labels == lab]
        assert char_ids(same) == char_ids(x[None])


def test_glyph_validation_split_is_deterministic_and_seeded(glyph_cfg):
    a = char_ids(build_run_data(glyph_cfg(val_classes=12), seed=7).heldout.images)
    b = char_ids(build_run_data(glyph_cfg(val_classes=12), seed=7).heldout.images)
    c = char_ids(build_run_data(glyph_cfg(val_classes=12), seed=8).heldout.images)
    assert a == b and a != c
    # split_seed overrides the run seed for both splits
    d = char_ids(build_run_data(glyph_cfg(val_classes=12, split_seed=7), seed=99).heldout.images)
    assert d == a
    held7 = char_ids(build_run_data(glyph_cfg(), seed=7).heldout.images)
    held_pinned = char_ids(build_run_data(glyph_cfg(split_seed=7), seed=99).heldout.images)
    assert held_pinned == held7


def test_glyph_validation_split_too_large(glyph_cfg):
    with pytest.raises(ValueError, match="val_classes"):
        build_run_data(glyph_cfg(val_classes=N_CHARS - 10), seed=0)


def test_synthetic_validation_split():
    cfg = DataConfig(dataset="synthetic", synthetic_classes=30, synthetic_per_class=3, heldout_classes=5,
                     val_classes=6, image_size=8)
    data = build_run_data(cfg, seed=3)
    plain = build_run_data(DataConfig(dataset="synthetic", synthetic_classes=30, synthetic_per_class=3,
                                      heldout_classes=5, image_size=8), seed=3)
    assert data.num_classes == 24 and len(data.train) == 24 * 3 and data.eval_split == "val"
    assert sorted(set(data.train.labels.tolist())) == list(range(24))
    assert sorted(set(data.heldout.labels.tolist())) == list(range(6)) and len(data.heldout.labels) == 18
    rows = lambda t: {tuple(r) for r in t.reshape(len(t), -1).tolist()}  # noqa: E731
    val, train = rows(data.heldout.images), rows(data.train.images)
    assert val.isdisjoint(train) and val.isdisjoint(rows(plain.heldout.images))
    assert val | train == rows(plain.train.images)


def test_config_val_classes_checked():
    assert load_config(None, ["--data.val_classes", "5"]).data.val_classes == 5
    assert load_config(None).data.val_classes == 0 and load_config(None).data.split_seed is None
    with pytest.raises(ConfigError, match="val_classes"):
        load_config(None, ["--data.val_classes", "-1"])
    with pytest.raises(ConfigError, match="val_classes"):
        DataConfig(dataset="folder", root="/x", val_classes=3)


def test_quality_gather_table(tmp_path):
    from launch.quality import gather, markdown_table
    for name, seed, tar in [("arcface", 1, 0.90), ("arcface", 2, 0.94), ("cosface", 1, 0.5)]:
        run = tmp_path / f"{name}_s{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"head:\n  margin: {name}\ndata:\n  val_classes: 0\n")
        (run / "history.json").write_text(json.dumps({"history": [], "final_eval": {
            "verification_acc": 0.99, "tar@far=1e-3": tar, "identification_top1": 0.9}}))
        (run / "train_rank0.log").write_text(
            "2026-01-01 10:00:00,000 [rank 0] data: 1 training samples\n"
            '2026-01-01 10:04:30,500 [rank 0] {"step": 10, "loss": 1.0}\n'
            "2026-01-01 10:04:40,000 [rank 0] eval at step 10: {}\n")
    rows = gather(sorted(tmp_path.iterdir()))
    assert [r["run"] for r in rows] == ["arcface_s1", "arcface_s2", "cosface_s1"]
    assert rows[0]["train_s"] == pytest.approx(270.5)
    table = markdown_table(rows, group_by="margin")
    assert "| arcface | mean |" in table and "0.9200" in table  # (0.90 + 0.94) / 2
    assert "0.5000" in table
    from launch.quality import summary_table
    summary = summary_table(rows).splitlines()
    assert len(summary) == 4 and summary[2].startswith("| arcface | 2 | 0.9900 | 0.9200 | 0.9000 |")


def test_margin_configs_differ_from_the_default_only_in_the_head():
    """configs/margins/*.yaml: the same run as configs/glyphs_cpu.yaml (data, model, optimizer,
    steps) with another margin, so the quality table compares margins at one budget."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(str(root / "glyphs_cpu.yaml")).to_dict()
    files = sorted((root / "margins").glob("*.yaml"))
    margins = set()
    for path in files:
        cfg = load_config(str(path)).to_dict()
        for section in ("data", "model", "optim", "eval"):
            assert cfg[section] == base[section], (path.name, section)
        assert {k: v for k, v in cfg["train"].items() if k != "output_dir"} == \
            {k: v for k, v in base["train"].items() if k != "output_dir"}, path.name
        assert cfg["train"]["output_dir"] != base["train"]["output_dir"]
        assert cfg["head"]["s"] == base["head"]["s"] and cfg["head"]["sample_rate"] == 1.0
        margins.add(cfg["head"]["margin"])
    assert {"arcface", "cosface", "sphereface", "combined", "adaface", "curricularface"} <= margins

"""Tests for launch.config: YAML -> typed dataclasses, overrides, round trip."""

from __future__ import annotations

import textwrap

import pytest

from launch.config import (
    ConfigError,
    EvalConfig,
    HeadConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    parse_overrides,
)

FULL_YAML = """
data:
  dataset: synthetic
  root: /data/faces
  cache_dir: /tmp/cache
  image_size: 112
  in_channels: 3
  heldout_classes: 10
  num_workers: 2
  augment: false
  hflip: yes
  synthetic_classes: 100
  synthetic_per_class: 4
model:
  backbone: resnet18
  embedding_size: 512
  dropout: 0.1
head:
  margin: combined
  s: 30
  m1: 1.0
  m2: 0.3
  m3: 0.2
  extension: linear
  straight_through: true
  sample_rate: 0.25
  chunk_size: 4096
  sparse_grad: true
  seed: 7
optim:
  optimizer: adamw
  lr: 1e-3
  head_lr: 0.01
  momentum: 0.0
  weight_decay: 0.05
  head_optimizer: sparse_sgd
  warmup_steps: 100
  schedule: cosine
  poly_power: 1.5
  clip_grad_norm: null
  grad_accum: 4
train:
  steps: 1000
  epochs: null
  batch_size: 64
  precision: bf16
  output_dir: runs/x
  log_every: 5
  ckpt_every: 200
  eval_every: 50
  resume: null
  seed: 99
  tensorboard: true
  num_threads: 2
eval:
  pairs: 600
  gallery_design: 1
  bin_files: [lfw.bin, cfp_fp.bin]
  batch_size: 128
"""


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_full_yaml_loads_with_correct_types(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML), [])
    assert cfg.data.dataset == "synthetic" and cfg.data.root == "/data/faces"
    assert cfg.data.image_size == 112 and type(cfg.data.image_size) is int
    assert cfg.data.augment is False and cfg.data.hflip is True
    assert cfg.model.embedding_size == 512 and cfg.model.dropout == pytest.approx(0.1)
    # `s: 30` is an int in YAML, coerced to the float annotation
    assert cfg.head.s == 30.0 and type(cfg.head.s) is float
    assert cfg.head.margin == "combined" and cfg.head.extension == "linear"
    assert cfg.head.chunk_size == 4096 and cfg.head.sparse_grad is True
    # PyYAML reads `1e-3` as a string; it must still become a float
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.optim.clip_grad_norm is None and cfg.optim.head_optimizer == "sparse_sgd"
    assert cfg.train.steps == 1000 and cfg.train.epochs is None and cfg.train.resume is None
    assert cfg.train.precision == "bf16" and cfg.train.tensorboard is True
    assert cfg.eval.bin_files == ["lfw.bin", "cfp_fp.bin"]


def test_defaults_and_partial_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 0.5\nmodel:\n"), [])
    assert cfg.optim.lr == 0.5
    assert cfg.optim.momentum == 0.9  # default kept
    assert cfg.model == TrainConfig().model
    assert load_config(None, []) == TrainConfig()
    assert TrainConfig().eval.bin_files == [] and TrainConfig().train.resume == "auto"


def test_misspelled_key_names_it_and_suggests(tmp_path):
    path = _write(tmp_path, "optim:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    msg = str(err.value)
    assert "'lerning_rate'" in msg and "'optim'" in msg and "did you mean 'lr'" in msg
    path = _write(tmp_path, "train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"'batch_sise'.*'train'.*did you mean 'batch_size'"):
        load_config(path, [])


def test_key_in_wrong_section_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'lr' in section 'train'.*key of section 'optim'"):
        load_config(_write(tmp_path, "train:\n  lr: 0.1\n"), [])
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'.*did you mean 'optim'"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 0.1\n"), [])


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("train:\n  batch_size: many\n", "train.batch_size", "int"),
        ("train:\n  batch_size: 1.5\n", "train.batch_size", "int"),
        ("optim:\n  lr: fast\n", "optim.lr", "float"),
        ("data:\n  augment: maybe\n", "data.augment", "bool"),
        ("model:\n  backbone: 50\n", "model.backbone", "str"),
        ("eval:\n  bin_files: 3\n", "eval.bin_files", "list of str"),
        ("head:\n  chunk_size: big\n", "head.chunk_size", "int or null"),
        ("train:\n  tensorboard: 1.0\n", "train.tensorboard", "bool"),
    ],
)
def test_wrong_type_errors(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), [])
    msg = str(err.value)
    assert msg.startswith(f"{key}: expected {expected}"), msg
    assert "got" in msg


def test_literal_choice_violation(tmp_path):
    with pytest.raises(ConfigError, match=r"head\.margin: expected one of .*'arcface'.*got 'arcfce'"):
        load_config(_write(tmp_path, "head:\n  margin: arcfce\n"), [])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, ["--train.precision", "fp8"])
    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        OptimConfig(schedule="linear")


@pytest.mark.parametrize(
    "text, match",
    [
        ("optim:\n  lr: 0\n", r"optim\.lr must be > 0"),
        ("optim:\n  lr: -0.1\n", r"optim\.lr must be > 0"),
        ("train:\n  batch_size: 0\n", r"train\.batch_size must be >= 1"),
        ("head:\n  sample_rate: 0\n", r"head\.sample_rate must be in \(0, 1\]"),
        ("head:\n  sample_rate: 1.5\n", r"head\.sample_rate must be in \(0, 1\]"),
        ("optim:\n  momentum: 1.0\n", r"optim\.momentum"),
        ("train:\n  steps: null\n  epochs: null\n", r"train\.steps"),
        ("data:\n  dataset: folder\n", r"data\.root must be set"),
    ],
)
def test_range_validation(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text), [])


def test_sections_validate_on_direct_construction():
    assert HeadConfig(sample_rate="0.5").sample_rate == 0.5
    with pytest.raises(ConfigError, match=r"head\.sample_rate"):
        HeadConfig(sample_rate=0.0)
    with pytest.raises(ConfigError, match=r"eval\.batch_size: expected int"):
        EvalConfig(batch_size="x")


def test_overrides_each_form(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.5\ntrain:\n  steps: 10\n")
    cfg = load_config(
        path,
        [
            "--optim.lr", "0.05",               # --section.key value
            "--train.steps=20",                 # --section.key=value
            "--momentum", "0.8",                # bare, unambiguous
            "--train.tensorboard",              # bool flag without value
            "--data.augment=false",
            "--eval.bin_files", "a.bin,b.bin",
            "--head.chunk_size", "none",
            "--train.log-every", "3",           # dashes accepted
            "--head.m3=-0.1",
        ],
    )
    assert cfg.optim.lr == 0.05 and type(cfg.optim.lr) is float
    assert cfg.train.steps == 20 and type(cfg.train.steps) is int
    assert cfg.optim.momentum == 0.8
    assert cfg.train.tensorboard is True and cfg.data.augment is False
    assert cfg.eval.bin_files == ["a.bin", "b.bin"]
    assert cfg.head.chunk_size is None and cfg.train.log_every == 3
    assert cfg.head.m3 == -0.1
    assert load_config(None, ["--eval.bin_files=[x.bin]"]).eval.bin_files == ["x.bin"]
    assert load_config(None, ["--eval.bin_files="]).eval.bin_files == []


def test_overrides_are_type_checked_and_validated():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int or null, got 'ten'"):
        load_config(None, ["--train.steps", "ten"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):
        load_config(None, ["--lr=-1"])
    with pytest.raises(ConfigError, match=r"ambiguous.*--train\.batch_size.*--eval\.batch_size"):
        load_config(None, ["--batch_size", "8"])
    with pytest.raises(ConfigError, match=r"lerning_rate.*did you mean --optim\.lr"):
        load_config(None, ["--lerning_rate", "0.1"])
    with pytest.raises(ConfigError, match=r"'lerning_rate' in section 'optim'.*did you mean 'lr'"):
        load_config(None, ["--optim.lerning_rate", "0.1"])
    with pytest.raises(ConfigError, match="missing value"):
        load_config(None, ["--optim.lr"])
    with pytest.raises(ConfigError, match="expected --section.key"):
        parse_overrides(["optim.lr", "0.1"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, FULL_YAML), ["--head.seed", "3", "--eval.bin_files="])
    out = tmp_path / "run" / "config.yaml"
    cfg.save_yaml(out)
    again = load_config(str(out), [])
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.to_dict()["head"]["seed"] == 3
    default = TrainConfig()
    default.save_yaml(tmp_path / "d.yaml")
    assert load_config(str(tmp_path / "d.yaml"), []) == default


def test_shipped_configs_load():
    """Every YAML in configs/ is a valid run config (a typo there would only show up at launch)."""
    from pathlib import Path
    from launch.config import load_config
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        load_config(str(path), [])

"""build_dataset dispatch and DataLoader integration."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import launch.data as D


def test_public_names():
    for name in D.__all__:
        assert hasattr(D, name), name


def test_glyphs_train_and_heldout(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = [ttf / "DejaVuSans.ttf", ttf / "DejaVuSerif.ttf", ttf / "cmr10.ttf"]
    chars = list("ABCDEFGHIJKLMNOPQRST")
    kw = dict(charset=chars, size=12, font_files=files, workers=1, progress=False,
              min_designs=2, heldout_classes=5, seed=0)
    train = D.build_dataset("glyphs", tmp_path, split="train", **kw)
    held = D.build_dataset("glyphs", tmp_path, split="heldout", **kw)
    assert train.num_classes == 15 and held.num_classes == 5
    assert set(train.glyphs.chars).isdisjoint(held.glyphs.chars)
    assert isinstance(train.transform, D.RandomAffine) and held.transform is None
    x, y = next(iter(DataLoader(train, batch_size=8, shuffle=False)))
    assert x.shape == (8, 1, 12, 12) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        D.build_dataset("glyphs", tmp_path, split="val", **kw)


def test_other_kinds(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "rec").mkdir()
    D.write_recordio(tmp_path / "rec" / "train", imgs, [0, 1, 0, 1])
    rec = D.build_dataset("recordio", tmp_path / "rec", transform=None)
    assert isinstance(rec, D.RecordIODataset) and len(rec) == 4 and rec.num_classes == 2
    (tmp_path / "img" / "id0").mkdir(parents=True)
    Image.fromarray(imgs[0]).save(tmp_path / "img" / "id0" / "a.png")
    folder = D.build_dataset("folder", tmp_path / "img", grayscale=True)
    assert folder[0][0].shape == (1, 4, 4)
    assert isinstance(folder.transform, D.RandomHorizontalFlip)  # faces flip by default
    pairs = D.build_dataset("bin", D.write_bin(tmp_path / "lfw.bin", imgs, [True, False]))
    assert pairs.transform is None and pairs.num_pairs == 2
    with pytest.raises(ValueError):
        D.build_dataset("folder")
    with pytest.raises(ValueError):
        D.build_dataset("webdataset", tmp_path)


def test_sampler_with_dataloader(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.arange(11))
    seen = []
    for rank in range(3):
        s = D.ShardedSampler(len(ds), 3, rank, batch_size=2, seed=1)
        seen += [int(v) for (b,) in DataLoader(ds, batch_size=2, sampler=s) for v in b]
    assert sorted(seen) == list(range(11))

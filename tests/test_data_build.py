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


@pytest.mark.parametrize("n,used", [(12, 12), (11, 6)])
def test_sampler_with_dataloader(n, used):
    """11 = one global step of 3 x 2 + 5 left, which would leave rank 2 a batch of one: dropped."""
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    seen = []
    for rank in range(3):
        s = D.ShardedSampler(len(ds), 3, rank, batch_size=2, seed=1)
        seen += [int(v) for (b,) in DataLoader(ds, batch_size=2, sampler=s) for v in b]
    assert sorted(seen) == sorted(s.epoch_order()[:used].tolist())


def write_jis1_cache(cache_dir: Path, size: int = 8) -> None:
    """A stand-in for the rendered kanji cache: 30 characters x up to 6 designs, random pixels."""
    rng = np.random.default_rng(0)
    rows = [(c, d) for c in range(30) for d in range(6) if (c + d) % 7]
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache_dir / f"glyphs_jis1_{size}.npz",  # the cache file name of charset jis1
             images=rng.integers(0, 256, (len(rows), size, size), dtype=np.uint8),
             labels=np.array([r[0] for r in rows]), design=np.array([r[1] for r in rows]),
             chars=np.array([chr(0x4E00 + i) for i in range(30)]), faces=np.array([f"f{i}" for i in range(6)]))


def test_run_data_glyphs_one_load_both_splits(tmp_path, monkeypatch):
    from launch.config import load_config

    write_jis1_cache(tmp_path)
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    cfg = load_config(None, ["--data.dataset", "glyphs", "--data.cache_dir", str(tmp_path), "--data.image_size", "8",
                             "--data.heldout_classes", "7", "--data.hflip", "true"])
    data = D.build_run_data(cfg.data, seed=1)
    assert len(loads) == 1  # the cache is read once for both splits
    assert data.num_classes == 23 and data.train.num_classes == 23
    assert data.train.transform is None  # glyphs are augmented per batch, on the training device
    assert isinstance(data.batch_transform, D.BatchRandomAffine) and data.batch_transform.hflip_p == 0.5
    train_gs, held_gs = D.split_glyphs(D.load_glyphs(loads[0], min_designs=4), 7, seed=1)
    assert data.train.glyphs.chars == train_gs.chars
    held = data.heldout  # the held-out identities as GlyphDataset items, untransformed
    expected = D.GlyphDataset(held_gs)
    assert torch.equal(held.images, torch.stack([expected[i][0] for i in range(len(expected))]))
    assert held.labels.tolist() == held_gs.labels.tolist() and len(set(held.labels.tolist())) == 7
    assert held.groups.tolist() == held_gs.designs.tolist()


def test_old_data_imports_still_work():
    import launch.datasets as old

    assert old.build_run_data is D.build_run_data and old.RunData is D.RunData and old.HeldOut is D.HeldOut

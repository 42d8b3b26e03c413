"""Image-folder data set on files the test writes."""

import pytest
import torch
from PIL import Image

from launch.data.folder import ImageFolderDataset, scan_image_folder

COLOURS = {"bob": (255, 0, 0), "alice": (0, 255, 0), "carol": (0, 0, 255)}


@pytest.fixture
def root(tmp_path):
    for name, rgb in COLOURS.items():
        d = tmp_path / name
        d.mkdir()
        for k in range(2):
            Image.new("RGB", (5, 4), rgb).save(d / f"{k}.png")
        (d / "notes.txt").write_text("not an image")
    (tmp_path / "alice" / "2.JPG").write_bytes(_jpeg((0, 255, 0)))
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (5, 4)).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "readme.png").write_bytes(b"top-level files are not identities")
    return tmp_path


def _jpeg(rgb):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (5, 4), rgb).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def test_sorted_folders_are_labels(root):
    classes, paths, labels = scan_image_folder(root)
    assert classes == ["alice", "bob", "carol"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    names = [p.name for p in paths]
    assert names == ["0.png", "1.png", "2.JPG", "0.png", "1.png", "0.png", "1.png"]


def test_rgb_items(root):
    ds = ImageFolderDataset(root)
    assert len(ds) == 7 and ds.num_classes == 3
    x, y = ds[3]  # bob: pure red
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.item() == 1
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    x2, _ = ds[2]  # the JPEG of alice: green, approximately
    assert x2[1].mean() > 0.9 and x2[0].mean() < -0.9


def test_grayscale_and_transform(root):
    ds = ImageFolderDataset(root, grayscale=True, transform=lambda t: t * 0.5)
    x, y = ds[3]
    assert x.shape == (1, 4, 5) and y.item() == 1
    grey_red = (255 * 299) // 1000  # ITU-R 601-2 luma of pure red, as Pillow's "L" mode
    assert x[0, 0, 0].item() == pytest.approx(0.5 * (grey_red / 127.5 - 1), abs=1 / 255)


def test_empty_or_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path)

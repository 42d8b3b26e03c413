"""insightface RecordIO: byte layout, round trip, header record, label arrays, errors."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.data.recordio import (RecordIODataset, RecordIOError, RecordIOReader, encode_record,
                                  iter_records, pack_payload, read_index, read_record,
                                  unpack_payload, write_recordio)
from launch.data.transforms import to_float

MAGIC_LE = bytes.fromhex("0a23d7ce")  # 0xced7230a little-endian


def images(n, h=6, w=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_file_layout_by_hand(tmp_path):
    imgs = images(2)
    rec, idx = write_recordio(tmp_path / "train", imgs, [0, 0])
    raw = rec.read_bytes()
    # record 0: magic, lrecord = 32 (24-byte IRHeader + two float32 labels), payload
    assert raw[:4] == MAGIC_LE
    assert struct.unpack("<I", raw[4:8])[0] == 32
    flag, label, id_, id2 = struct.unpack("<IfQQ", raw[8:32])
    assert (flag, label) == (2, 0.0)
    assert struct.unpack("<2f", raw[32:40]) == (3.0, 4.0)  # 2 images -> [3, 3 + 1 class)
    lines = idx.read_text().splitlines()
    assert lines[0] == "0\t0" and lines[1] == "1\t40"
    assert [int(line.split("\t")[0]) for line in lines] == [0, 1, 2, 3]
    for line in lines:  # every offset points at a magic word on a 4-byte boundary
        off = int(line.split("\t")[1])
        assert off % 4 == 0 and raw[off:off + 4] == MAGIC_LE
    assert len(raw) % 4 == 0


def test_round_trip_grouped_by_label(tmp_path):
    imgs = images(5)
    labels = [2, 0, 2, 1, 0]
    write_recordio(tmp_path / "train", imgs, labels)  # PNG: lossless
    ds = RecordIODataset(tmp_path)  # a folder with train.rec / train.idx
    assert len(ds) == 5 and ds.num_classes == 3 and ds.header0 == (6, 9)
    order = [1, 4, 3, 0, 2]  # stable sort of the inputs by label
    for i, j in enumerate(order):
        x, y = ds[i]
        assert x.shape == (3, 6, 8) and x.dtype == torch.float32
        assert torch.equal(x, to_float(imgs[j]))
        assert y.dtype == torch.int64 and y.item() == labels[j]
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]


def test_identity_records(tmp_path):
    write_recordio(tmp_path / "train", images(5), [2, 0, 2, 1, 0])
    r = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    head, data = r.read_header(0)
    assert head.flag == 2 and head.label.tolist() == [6.0, 9.0] and data == b""
    ranges = [r.read_header(k)[0].label.tolist() for k in (6, 7, 8)]
    assert ranges == [[1.0, 3.0], [3.0, 4.0], [4.0, 6.0]]  # class 0: keys 1-2, 1: 3, 2: 4-5
    with pytest.raises(KeyError):
        r.read(9)


def rewrite_header_last(prefix):
    """Rewrite ``<prefix>.rec/.idx`` in insightface face2rec2's record order: image records,
    identity records, and the header record (key 0) last, so train.idx does not start with 0."""
    rec, idx = Path(f"{prefix}.rec"), Path(f"{prefix}.idx")
    keys, offsets = read_index(idx)
    with open(rec, "rb") as f:
        records = [(int(k), read_record(f, int(o))) for k, o in zip(keys, offsets)]
    assert records[0][0] == 0
    with open(rec, "wb") as f, open(idx, "w") as fi:
        for key, payload in records[1:] + records[:1]:
            fi.write(f"{key}\t{f.tell()}\n")
            f.write(encode_record(payload))
    return rec, idx


@pytest.mark.parametrize("label_arrays", [False, True])
def test_header_record_written_last_face2rec2_order(tmp_path, label_arrays):
    imgs, labels = images(5, seed=4), [2, 0, 2, 1, 0]
    write_recordio(tmp_path / "train", imgs, labels, label_arrays=label_arrays)
    _, idx = rewrite_header_last(tmp_path / "train")
    lines = idx.read_text().splitlines()
    assert lines[0].startswith("1\t") and lines[-1].startswith("0\t")
    ds = RecordIODataset(tmp_path)
    assert ds.header0 == (6, 9) and len(ds) == 5 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]
    for i, j in enumerate([1, 4, 3, 0, 2]):  # stable sort of the inputs by label
        x, y = ds[i]
        assert torch.equal(x, to_float(imgs[j])) and y.item() == labels[j]


def test_label_arrays_flag_gt_zero(tmp_path):
    imgs = images(3, seed=1)
    write_recordio(tmp_path / "t", imgs, [1, 0, 1], label_arrays=True)
    r = RecordIOReader(tmp_path / "t.rec", tmp_path / "t.idx")
    head, _ = r.read_header(1)
    assert head.flag == 1 and isinstance(head.label, np.ndarray) and head.label.tolist() == [0.0]
    ds = RecordIODataset(tmp_path / "t.rec")
    assert [ds[i][1].item() for i in range(3)] == [0, 1, 1]
    # payload helpers, independent of files
    payload = pack_payload([7, 3.5, -1], b"IMG", id=4, id2=5)
    assert payload[:24] == struct.pack("<IfQQ", 3, 0.0, 4, 5)
    h, d = unpack_payload(payload)
    assert h.label.tolist() == [7.0, 3.5, -1.0] and h.class_id == 7 and d == b"IMG"
    h, d = unpack_payload(struct.pack("<IfQQ", 0, 12.0, 0, 0) + b"x")
    assert h.flag == 0 and h.label == 12.0 and h.class_id == 12 and d == b"x"


def test_multi_part_record_split_at_aligned_magic():
    payload = b"abcd" + MAGIC_LE + b"efgh" + MAGIC_LE + b"xy"
    expected = (MAGIC_LE + struct.pack("<I", (1 << 29) | 4) + b"abcd"
                + MAGIC_LE + struct.pack("<I", (2 << 29) | 4) + b"efgh"
                + MAGIC_LE + struct.pack("<I", (3 << 29) | 2) + b"xy\0\0")
    enc = encode_record(payload)
    assert enc == expected
    assert read_record(io.BytesIO(enc)) == payload
    # an unaligned magic is not a frame boundary
    unaligned = b"ab" + MAGIC_LE + b"cd"
    enc2 = encode_record(unaligned)
    assert enc2 == MAGIC_LE + struct.pack("<I", 8) + unaligned
    assert read_record(io.BytesIO(enc2)) == unaligned


def test_multi_part_image_record_in_dataset(tmp_path):
    # a label whose float32 bytes equal the magic forces a split inside the payload
    magic_float = struct.unpack("<f", MAGIC_LE)[0]
    buf = io.BytesIO()
    Image.fromarray(images(1)[0]).save(buf, format="PNG")
    rec = tmp_path / "x.rec"
    with open(rec, "wb") as f:
        f.write(encode_record(pack_payload([0, magic_float], buf.getvalue())))
    # no header record (flag of record 0 is > 0 here, so use the reader directly)
    (off, payload), = list(iter_records(rec))
    h, data = unpack_payload(payload)
    assert off == 0 and h.flag == 2 and h.label[1] == np.float32(magic_float)
    assert data == buf.getvalue()


def test_set_without_header_record(tmp_path):
    imgs = images(3, seed=2)
    rec, idx = tmp_path / "plain.rec", tmp_path / "plain.idx"
    with open(rec, "wb") as f, open(idx, "w") as fi:
        for k, (im, lab) in enumerate(zip(imgs, [4, 2, 4])):
            b = io.BytesIO()
            Image.fromarray(im).save(b, format="PNG")
            fi.write(f"{k}\t{f.tell()}\n")
            f.write(encode_record(pack_payload(lab, b.getvalue())))
    ds = RecordIODataset(rec)
    assert ds.header0 is None and len(ds) == 3
    assert [ds[i][1].item() for i in range(3)] == [4, 2, 4]
    assert torch.equal(ds[1][0], to_float(imgs[1]))
    idx.unlink()  # without an .idx the file is scanned: keys 0..n-1
    assert RecordIOReader(rec).keys == [0, 1, 2]


def test_jpeg_and_grey(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    img = np.stack([smooth, smooth.T, np.full_like(smooth, 128)], -1)
    write_recordio(tmp_path / "train", [img], [0], image_format="JPEG")
    x, _ = RecordIODataset(tmp_path)[0]
    assert (x - to_float(img)).abs().mean() < 0.05  # lossy but close
    g, _ = RecordIODataset(tmp_path, rgb=False)[0]
    assert g.shape == (1, 16, 16)


def test_bad_magic_raises_clear_error(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"\x00" * 64)
    (tmp_path / "train.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match="magic"):
        RecordIODataset(tmp_path)
    write_recordio(tmp_path / "ok", images(2), [0, 1])
    (tmp_path / "ok.idx").write_text("0\t0\n1\t6\n")  # offset not at a record start
    r = RecordIOReader(tmp_path / "ok.rec", tmp_path / "ok.idx")
    with pytest.raises(RecordIOError, match="magic"):
        r.read(1)
    (tmp_path / "bad.idx").write_text("zero\t0\n")
    with pytest.raises(RecordIOError, match="key"):
        read_index(tmp_path / "bad.idx")


def test_truncated_file(tmp_path):
    rec, _ = write_recordio(tmp_path / "train", images(1), [0])
    raw = rec.read_bytes()
    rec.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(RecordIOError, match="truncated"):
        list(iter_records(rec))

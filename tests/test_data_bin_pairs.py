"""insightface .bin verification sets: loading and the restricted unpickler."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from launch.data.bin_pairs import (BinPairsDataset, UnsafePickleError, load_bin,
                                   restricted_loads, write_bin)
from launch.data.transforms import to_float


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def faces(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("numpy_issame", [False, True])
def test_load_file_written_by_pickle(tmp_path, protocol, numpy_issame):
    imgs = faces(6)
    issame = [True, False, True]
    obj = ([png(a) for a in imgs], np.array(issame) if numpy_issame else issame)
    p = tmp_path / "lfw.bin"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    bins, same = load_bin(p)
    assert same.dtype == np.bool_ and same.tolist() == issame
    assert bins == obj[0]
    ds = BinPairsDataset(p)
    assert len(ds) == 6 and ds.num_pairs == 3 and ds.name == "lfw"
    x, pair = ds[5]
    assert x.shape == (3, 4, 4) and pair.item() == 2
    assert torch.equal(x, to_float(imgs[5]))


def test_python2_pickle_with_byte_strings(tmp_path):
    """Hand-assembled protocol-2 pickle as Python 2 writes it: py2 ``str`` images
    (SHORT_BINSTRING) that only load with encoding='bytes'."""
    imgs = [png(a) for a in faces(2, seed=1)]
    assert all(len(b) < 256 for b in imgs)
    # PROTO 2, EMPTY_LIST, MARK, SHORT_BINSTRING..., APPENDS
    data = b"\x80\x02]q\x00(" + b"".join(b"U" + bytes([len(b)]) + b for b in imgs) + b"e"
    # EMPTY_LIST, NEWTRUE, APPEND, TUPLE2, STOP
    data += b"]q\x01\x88a\x86q\x02."
    p = tmp_path / "agedb_30.bin"
    p.write_bytes(data)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # the py3 default (ASCII) cannot read it
    bins, same = load_bin(p)
    assert bins == imgs and same.tolist() == [True]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.bin"
    p.write_bytes(pickle.dumps(([b"x", _Evil(marker)], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_bin(p)
    assert not marker.exists()
    for proto in (0, 4):
        with pytest.raises(UnsafePickleError):
            restricted_loads(pickle.dumps(_Evil(marker), protocol=proto))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="eval"):
        restricted_loads(b"cbuiltins\neval\n(V1+1\ntR.")


def test_numpy_only_bool_and_uint8(tmp_path):
    ok = restricted_loads(pickle.dumps((np.array([1, 2], np.uint8), np.bool_(True)), protocol=2))
    assert ok[0].tolist() == [1, 2] and ok[1] is np.True_
    for bad in (np.array([1.5]), np.array(["a"], dtype=object)):
        for proto in (2, 5):
            with pytest.raises(UnsafePickleError):
                restricted_loads(pickle.dumps(bad, protocol=proto))


def test_uint8_array_images_and_shape_checks(tmp_path):
    imgs = [png(a) for a in faces(2)]
    p = tmp_path / "a.bin"
    p.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in imgs], [False]), protocol=5))
    bins, same = load_bin(p)
    assert bins == imgs and same.tolist() == [False]
    p.write_bytes(pickle.dumps((imgs, [True, False]), protocol=2))
    with pytest.raises(ValueError, match="2 per pair"):
        load_bin(p)


def test_write_bin_and_resize(tmp_path):
    imgs = faces(4, seed=3)
    p = write_bin(tmp_path / "cfp_fp.bin", imgs, [False, True])
    ds = BinPairsDataset(p, image_size=(8, 6))
    assert ds.issame.tolist() == [False, True]
    x, _ = ds[0]
    assert x.shape == (3, 8, 6)
    assert struct.unpack("<B", p.read_bytes()[1:2])[0] == pickle.HIGHEST_PROTOCOL

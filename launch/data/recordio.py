"""Read (and, for tests, write) insightface RecordIO training sets without MXNet.

Files: ``train.rec`` (records) and ``train.idx`` (text lines ``key\\toffset``:
the byte offset of record ``key`` in ``train.rec``), as used by MS1MV3,
Glint360K and WebFace.

On-disk frame (little-endian)::

    uint32 magic  = 0xCED7230A
    uint32 lrecord = (cflag << 29) | length      # cflag: upper 3 bits
    length bytes of data, then zero padding to a multiple of 4

A record normally is one frame with ``cflag = 0``. The writer splits a payload
wherever the magic number appears in it at a 4-byte-aligned position (so a
reader can resynchronise): the pieces are written as frames with ``cflag`` 1
(first), 2 (middle) and 3 (last), the magic word itself being dropped; a
reader joins the pieces with the magic word between them.

Record payload::

    IRHeader  struct "<IfQQ": flag (uint32), label (float32), id, id2 (uint64)
    if flag > 0: flag float32 values -- the label array (then ``label`` is 0)
    encoded image (JPEG / PNG), possibly empty

insightface layout (record keys):

* key 0: the header record (found by its key: ``im2rec`` writes it first,
  insightface's ``face2rec2`` last), ``flag = 2`` and label array ``[a, b]`` where
  ``a = 1 + number of images`` and ``b = a + number of identities``. Image
  records are keys ``1 .. a-1``; keys ``a .. b-1`` are one record per identity
  whose label array ``[start, end)`` gives that identity's image keys (and whose
  image is empty). Hence ``a`` is *one past the last image key* (= the first
  identity-record key), not the first image key, and the number of classes
  is ``b - a``. When there is no record 0, or it has ``flag = 0`` (an image),
  the set has no such header and every key of the .idx file is an image.
* image records: ``flag = 0`` and the class id in ``label`` (float32), or
  ``flag > 0`` and the class id in ``label_array[0]``.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import to_float

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_MAX_LEN = (1 << 29) - 1

PathLike = Union[str, Path]


class RecordIOError(ValueError):
    """A .rec/.idx file is not in the expected format."""


@dataclass
class IRHeader:
    """Image-record header: ``label`` is a float (flag == 0) or float32 array (flag > 0)."""

    flag: int
    label: Union[float, np.ndarray]
    id: int = 0
    id2: int = 0

    @property
    def class_id(self) -> int:
        """Class of an image record (``label`` or ``label[0]``)."""
        if isinstance(self.label, np.ndarray):
            return int(self.label[0])
        return int(self.label)


# --------------------------------------------------------------------------- payload
def pack_payload(label: Union[float, Sequence[float], np.ndarray], data: bytes = b"",
                 id: int = 0, id2: int = 0) -> bytes:
    """IRHeader (+ label array when ``label`` is a sequence) + ``data``."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + data
    arr = np.asarray(label, dtype="<f4").ravel()
    if arr.size == 0:
        raise ValueError("a label array needs at least one value")
    return struct.pack(IR_FORMAT, arr.size, 0.0, id, id2) + arr.tobytes() + data


def unpack_payload(buf: bytes) -> Tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the image bytes."""
    if len(buf) < IR_SIZE:
        raise RecordIOError(f"record of {len(buf)} bytes is shorter than an IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, buf, 0)
    pos = IR_SIZE
    if flag > 0:
        end = pos + 4 * flag
        if end > len(buf):
            raise RecordIOError(f"label array of {flag} floats runs past the record end")
        label = np.frombuffer(buf, dtype="<f4", count=flag, offset=pos).astype(np.float32)
        pos = end
    return IRHeader(flag, label, id_, id2), buf[pos:]


# --------------------------------------------------------------------------- frames
def encode_record(payload: bytes) -> bytes:
    """The bytes of one record in a .rec file (frames, split at aligned magics, padded)."""
    if len(payload) > _MAX_LEN:
        raise ValueError("RecordIO records must be shorter than 2**29 bytes")
    out = bytearray()
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            out += struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (i - start))
            out += payload[start:i]  # aligned: length is a multiple of 4
            start = i + 4
    tail = len(payload) - start
    out += struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | tail)
    out += payload[start:]
    out += b"\0" * (-tail % 4)
    return bytes(out)


def read_record(f: BinaryIO, offset: Optional[int] = None) -> Optional[bytes]:
    """Read the record at ``offset`` (default: current position) from an open
    .rec file; None at end of file. Raises :class:`RecordIOError` on a bad frame."""
    if offset is not None:
        f.seek(offset)
    parts: List[bytes] = []
    while True:
        pos = f.tell()
        head = f.read(8)
        if not head and not parts:
            return None
        if len(head) < 8:
            raise RecordIOError(f"truncated record header at offset {pos}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(
                f"bad RecordIO magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}): "
                "not a RecordIO file, or a wrong .idx offset")
        cflag, length = lrec >> 29, lrec & _MAX_LEN
        data = f.read(length + (-length % 4))
        if len(data) < length:
            raise RecordIOError(f"truncated record at offset {pos}")
        parts.append(data[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        if cflag not in (1, 2):
            raise RecordIOError(f"bad continuation flag {cflag} at offset {pos}")


def iter_records(rec_path: PathLike) -> Iterator[Tuple[int, bytes]]:
    """Sequentially yield ``(offset, payload)`` for every record of a .rec file."""
    with open(rec_path, "rb") as f:
        while True:
            offset = f.tell()
            payload = read_record(f)
            if payload is None:
                return
            yield offset, payload


def read_index(idx_path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Parse a .idx file: ``(keys, offsets)``, int64 arrays (K,) in file order.

    Arrays rather than a dict keep the index of a multi-million-image set small
    (and cheap to share with DataLoader workers).
    """
    text = Path(idx_path).read_text(encoding="ascii")
    tokens = text.split()
    lines = sum(1 for line in text.split("\n") if line.strip())
    try:
        if len(tokens) != 2 * lines:
            raise ValueError("not two fields per line")
        table = np.array(tokens, dtype=np.int64).reshape(-1, 2)  # (K, 2)
    except ValueError:  # locate the bad line for the message
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.strip().split("\t")
            if line.strip() and (len(fields) != 2 or not all(f.strip().isdigit() for f in fields)):
                raise RecordIOError(
                    f"{idx_path}:{n}: expected 'key<TAB>offset', got {line!r}") from None
        raise RecordIOError(f"{idx_path}: malformed index file") from None
    return table[:, 0].copy(), table[:, 1].copy()


class RecordIOReader:
    """Random access to the records of a .rec file through its .idx.

    Without an .idx the file is scanned once and records get keys 0, 1, ...
    The file is opened lazily and reopened after a fork (DataLoader workers).
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None) -> None:
        self.rec_path = str(rec_path)
        if idx_path is not None and os.path.exists(idx_path):
            keys, offsets = read_index(idx_path)
        else:
            offsets = np.array([off for off, _ in iter_records(self.rec_path)], dtype=np.int64)
            keys = np.arange(len(offsets), dtype=np.int64)
        self._keys = keys  # (K,) in file order
        self._offsets = offsets  # (K,)
        self._sort = np.argsort(keys, kind="stable")  # (K,)
        self._sorted_keys = keys[self._sort]  # (K,)
        self._file: Optional[BinaryIO] = None
        self._pid = -1

    @property
    def keys(self) -> List[int]:
        """Record keys in .idx order."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def _position(self, key: int) -> Optional[int]:
        """Position of ``key`` in the sorted keys, or None if absent."""
        pos = int(np.searchsorted(self._sorted_keys, key))
        found = pos < len(self._sorted_keys) and self._sorted_keys[pos] == key
        return pos if found else None

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` (KeyError if absent)."""
        pos = self._position(key)
        if pos is None:
            raise KeyError(f"no record with key {key} in {self.rec_path}")
        return int(self._offsets[self._sort[pos]])

    def _handle(self) -> BinaryIO:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        """Payload of record ``key``."""
        offset = self.offset(key)
        payload = read_record(self._handle(), offset)
        if payload is None:
            raise RecordIOError(
                f"record {key} at offset {offset} is past the end of {self.rec_path}")
        return payload

    def read_header(self, key: int) -> Tuple[IRHeader, bytes]:
        """``(IRHeader, image bytes)`` of record ``key``."""
        return unpack_payload(self.read(key))

    def close(self) -> None:
        """Close the file handle (it reopens on the next read)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        return state


# --------------------------------------------------------------------------- writer
def _encode_image(image: Union[bytes, np.ndarray, Image.Image], fmt: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt.upper() in ("JPEG", "JPG") else {}))
    return buf.getvalue()


def write_recordio(
    path_prefix: PathLike,
    images: Sequence[Union[bytes, np.ndarray, Image.Image]],
    labels: Sequence[int],
    image_format: str = "PNG",
    label_arrays: bool = False,
) -> Tuple[Path, Path]:
    """Write ``<prefix>.rec`` / ``<prefix>.idx`` in insightface's layout.

    Images (uint8 (H, W) / (H, W, 3) arrays, PIL images, or already-encoded
    bytes) are stored grouped by label (stable order) as keys ``1..N``, followed
    by one identity record per distinct label and the header record at key 0
    (see the module docstring). ``label_arrays=True`` stores image labels as a
    one-element label array (``flag = 1``) instead of the float field.
    Returns ``(rec_path, idx_path)``.
    """
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    prefix = str(path_prefix)
    rec_path, idx_path = Path(prefix + ".rec"), Path(prefix + ".idx")
    order = sorted(range(len(labels)), key=lambda i: int(labels[i]))  # stable
    classes = sorted({int(lab) for lab in labels})
    first_id_key = len(images) + 1
    payloads: List[Tuple[int, bytes]] = [
        (0, pack_payload([first_id_key, first_id_key + len(classes)]))]
    ranges: Dict[int, List[int]] = {}
    for key, i in enumerate(order, 1):
        lab = int(labels[i])
        ranges.setdefault(lab, [key, key])[1] = key + 1
        data = _encode_image(images[i], image_format)
        payloads.append((key, pack_payload([lab] if label_arrays else lab, data, id=key)))
    for j, lab in enumerate(classes):
        payloads.append((first_id_key + j, pack_payload(ranges[lab])))
    with open(rec_path, "wb") as rec, open(idx_path, "w", encoding="ascii") as idx:
        for key, payload in payloads:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(encode_record(payload))
    return rec_path, idx_path


# --------------------------------------------------------------------------- dataset
def _locate(root: PathLike) -> Tuple[Path, Path]:
    """(rec, idx) paths from a folder holding train.rec or a path prefix / .rec path."""
    p = Path(root)
    if p.is_dir():
        return p / "train.rec", p / "train.idx"
    if p.suffix == ".rec":
        return p, p.with_suffix(".idx")
    return Path(str(p) + ".rec"), Path(str(p) + ".idx")


class RecordIODataset(Dataset):
    """Images of an insightface RecordIO set: ``(image, label)``.

    ``image`` is float32 (3, H, W) in [-1, 1] (RGB; (1, H, W) when ``rgb`` is
    False) after the optional ``transform``; ``label`` an int64 scalar tensor.

    Args:
        root: folder with ``train.rec``/``train.idx``, or a ``.rec`` path / prefix.
        transform: callable on the (C, H, W) float tensor.
        rgb: decode to RGB (True) or grey.
    """

    def __init__(self, root: PathLike,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 rgb: bool = True) -> None:
        rec, idx = _locate(root)
        if not rec.exists():
            raise FileNotFoundError(f"no RecordIO file at {rec}")
        self.reader = RecordIOReader(rec, idx)
        self.transform = transform
        self.rgb = rgb
        self.header0 = self._read_header0()
        if self.header0 is not None:  # images are keys 1 .. a-1
            self.image_keys = np.arange(1, self.header0[0], dtype=np.int64)
        else:  # no header: every record is an image
            self.image_keys = np.asarray(self.reader.keys, dtype=np.int64)
        self._labels: Optional[np.ndarray] = None

    def _read_header0(self) -> Optional[Tuple[int, int]]:
        """``(a, b)`` of insightface's header record, read by key 0 wherever the
        .idx lists it; None when there is no key 0 or record 0 is an image."""
        if 0 not in self.reader:
            return None
        header, _ = self.reader.read_header(0)
        if header.flag == 0 or np.size(header.label) < 2:
            return None
        return int(header.label[0]), int(header.label[1])

    @property
    def num_classes(self) -> int:
        """Number of identities (from the header when present, else by scanning)."""
        if self.header0 is not None:
            return self.header0[1] - self.header0[0]
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels of all images (reads every record header once)."""
        if self._labels is None:
            self._labels = np.array(
                [self.reader.read_header(int(k))[0].class_id for k in self.image_keys],
                dtype=np.int64)
        return self._labels

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        header, data = self.reader.read_header(int(self.image_keys[i]))
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB" if self.rgb else "L"))  # (H, W[, 3])
        x = to_float(arr)  # (C, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(header.class_id, dtype=torch.int64)

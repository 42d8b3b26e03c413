"""insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds the
encoded images (JPEG/PNG bytes), two per pair (``bins[2i]``, ``bins[2i+1]``),
and ``issame_list`` one boolean per pair (a list of bools, or in some files a
numpy bool array). Many were written by Python 2, so strings load with
``encoding="bytes"``.

Pickles can run arbitrary code, so they are loaded with
:class:`RestrictedUnpickler`, which resolves no global except the few numpy
callables needed to rebuild a bool / uint8 ndarray or scalar (``_reconstruct``,
``ndarray``, ``dtype``, ``scalar``, ``_frombuffer``, each checking its dtype)
and ``_codecs.encode`` with the ``latin1`` codec (how Python 3 protocol-2
pickles store ``bytes``). Anything else raises :class:`UnsafePickleError` before it runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import to_float

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore
    from numpy.core.multiarray import scalar as _np_scalar  # type: ignore

PathLike = Union[str, Path]

_ALLOWED_DTYPES = (np.dtype(np.bool_), np.dtype(np.uint8))


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something a verification set never contains."""


class BinFileError(ValueError):
    """A ``.bin`` file is not a readable verification set (corrupt, truncated, wrong content)."""


def _checked_dtype(dtype: np.dtype) -> np.dtype:
    if dtype not in _ALLOWED_DTYPES:
        raise UnsafePickleError(f"numpy dtype {dtype} is not allowed in a .bin file "
                                "(only bool and uint8)")
    return dtype


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` restricted to bool / uint8."""
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype spec {spec!r} is not allowed")
    return _checked_dtype(np.dtype(spec, bool(align), bool(copy)))


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ndarray unpickling helper, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"ndarray subtype {subtype!r} is not allowed")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar unpickling helper, for bool / uint8 scalars only."""
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError("numpy scalar without a dtype")
    _checked_dtype(dtype)
    return _np_scalar(dtype, data) if data is not None else _np_scalar(dtype)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 ndarray helper (``_frombuffer``), bool / uint8 only."""
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError("ndarray buffer without a dtype")
    _checked_dtype(dtype)
    if order not in ("C", "F"):
        raise UnsafePickleError(f"bad array order {order!r}")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)


def _safe_codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes: str -> latin1 bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed as str.encode('latin1')")
    return obj.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: dict = {("_codecs", "encode"): _safe_codecs_encode,
                  ("numpy", "ndarray"): np.ndarray,
                  ("numpy", "dtype"): _safe_dtype}
for _m in _NUMPY_MODULES:
    _ALLOWED[(_m, "_reconstruct")] = _safe_reconstruct
    _ALLOWED[(_m, "scalar")] = _safe_scalar
for _m in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_m, "_frombuffer")] = _safe_frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a ``.bin`` file needs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a verification .bin file holds only "
                "bytes, bools and bool/uint8 numpy arrays (the file may be malicious)") from None


def restricted_loads(data: bytes, encoding: str = "bytes") -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _as_bytes(item: Any, latin1: bool) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str) and latin1:  # a py2 str loaded with encoding="latin1"
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise BinFileError(f"unexpected image entry of type {type(item).__name__} in .bin file")


def _unpickle(raw: bytes, path: PathLike) -> Tuple[Any, bool]:
    """(object, whether it needed ``encoding="latin1"``). Raises
    :class:`UnsafePickleError`, or :class:`BinFileError` for any other failure."""
    try:
        try:
            return restricted_loads(raw, encoding="bytes"), False
        except UnsafePickleError:
            raise
        except (UnicodeDecodeError, TypeError, ValueError):  # numpy state from py2 needs latin1
            return restricted_loads(raw, encoding="latin1"), True
    except UnsafePickleError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt bytes fail in many ways
        raise BinFileError(f"{path}: not a readable .bin pickle ({type(exc).__name__}: {exc})") from exc


def load_bin(path: PathLike) -> Tuple[List[bytes], np.ndarray]:
    """Load a verification ``.bin``: (encoded images (2P), bool issame (P,)).

    Raises OSError (unreadable file), :class:`UnsafePickleError` (refused
    content) or :class:`BinFileError` (corrupt or truncated pickle, wrong layout).
    """
    obj, latin1 = _unpickle(Path(path).read_bytes(), path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinFileError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame = obj
    if not isinstance(bins, (tuple, list)):
        raise BinFileError(f"{path}: bins is a {type(bins).__name__}, expected a list of images")
    images = [_as_bytes(b, latin1) for b in bins]
    same = np.asarray(issame)
    if same.dtype != np.bool_:
        if not np.isin(same, (0, 1)).all():
            raise BinFileError(f"{path}: issame_list is not boolean")
        same = same.astype(bool)
    same = same.reshape(-1)
    if len(images) != 2 * len(same):
        raise BinFileError(f"{path}: {len(images)} images for {len(same)} pairs "
                           "(expected 2 per pair)")
    return images, same


def write_bin(path: PathLike, images: Sequence[Union[bytes, np.ndarray]],
              issame: Sequence[bool], image_format: str = "PNG") -> Path:
    """Write a ``.bin`` set (uint8 arrays are encoded with Pillow), e.g. for tests."""
    bins = []
    for im in images:
        if isinstance(im, (bytes, bytearray)):
            bins.append(bytes(im))
        else:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(im)).save(buf, format=image_format)
            bins.append(buf.getvalue())
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(s) for s in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def decode_image(data: bytes, rgb: bool = True,
                 size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode to uint8 (H, W, 3) RGB (or (H, W) grey), resized to ``size=(H, W)`` if given."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB" if rgb else "L")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(img)


class BinPairsDataset(Dataset):
    """Images of a verification ``.bin``: item ``i`` is ``(image, pair index)``.

    ``image`` is float32 (3, H, W) in [-1, 1] (or (1, H, W) if ``rgb`` is
    False); pair ``p`` is images ``2p`` and ``2p + 1`` and ``issame[p]`` tells
    whether they show the same identity.
    """

    def __init__(self, path: PathLike, image_size: Optional[Tuple[int, int]] = None,
                 rgb: bool = True,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.bins, self.issame = load_bin(self.path)
        self.image_size = image_size
        self.rgb = rgb
        self.transform = transform

    @property
    def num_pairs(self) -> int:
        """Number of pairs P."""
        return len(self.issame)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = to_float(decode_image(self.bins[i], self.rgb, self.image_size))  # (C, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(i // 2, dtype=torch.int64)

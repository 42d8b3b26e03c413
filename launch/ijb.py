"""IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 ... 1e-1, the protocol the field runs.

    python -m launch.evaluate --ijb /data/IJB_release/IJBC --target IJBC --checkpoint runs/x/checkpoints/step_N
    python -m launch.evaluate --ijb /data/IJB_release/IJBB --target IJBB --onnx backbone.onnx --output results/
    torchrun --nproc_per_node=8 -m launch.evaluate --ijb ROOT --target IJBC --checkpoint DIR

``ROOT`` has the standard layout: ``meta/<target>_face_tid_mid.txt`` (``image template_id media_id``
per face), ``meta/<target>_template_pair_label.txt`` (``template_1 template_2 label``),
``meta/<target>_name_5pts_score.txt`` (``image x1 y1 ... x5 y5 detector_score``; the landmarks are
left eye, right eye, nose, left and right mouth corner) and ``loose_crop/<image>``. The target is
spelled in lower case in the released files (``ijbc_...``); upper case is accepted too.

Steps, "N1D1F1" by default (each letter a switch, as in the field's scripts):

1. align every image by its 5 landmarks to the ArcFace template (:mod:`launch.align`);
2. embed it and its horizontal mirror (RGB, ``v / 127.5 - 1`` as in training,
   :func:`launch.data.transforms.to_float`; fp32 results), cached on disk in chunks;
3. image feature = embedding + mirror's embedding (F1; F0: the image's only); its norm is
   kept (N1; N0: L2-normalised), times the detector score (D1; D0: not);
4. template feature = sum over the template's medias of the mean of that media's image
   features, L2-normalised; 5. score of a pair = cosine of its two template features;
6. TAR at each FAR from the ROC over all pairs (:func:`launch.metrics.roc_metrics`:
   the highest TAR whose FAR is <= the target, NaN (``null`` in the JSON, ``n/a`` in the table)
   when there are fewer than 1 / FAR impostor pairs). The field's scripts take the ROC point of
   *nearest* FAR instead, which may lie above the target; here the FAR is never exceeded.

Scale: IJB-C is ~470k images and ~15.7M pairs. Images are read, aligned and batched by a
``DataLoader`` (``--workers`` processes, bounded prefetch); each rank of a ``torchrun`` job embeds
a share of the chunks still missing from the cache, on its own device; rank 0 then pools the
chunks one at a time (memory: templates x d) and writes ``ijb_<target>.json``,
``ijb_<target>_roc.png`` and the pair scores ``ijb_<target>_scores.npy`` to ``--output`` (default: ``<checkpoint>/ijb`` or ``<model>_ijb/`` beside
the ONNX file) and prints the table. The cache (``--cache``, default ``<output>/cache``) holds
``(n, 2, d)`` float32 chunks of the raw embeddings of image and mirror, under a folder named
by a fingerprint of the model's weights, the image list, the landmarks and the input size: an
interrupted run, or one with other N/D/F switches, embeds only what is missing. Results do
not depend on the batch size (no padding, no sorting, eval-mode BatchNorm; tested).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from launch.align import align_face
from launch.data.transforms import to_float
from launch.metrics import far_key, roc_metrics

FARS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS: Tuple[str, ...] = ("IJBC", "IJBB")
#: images per cache chunk: fixed, so a cache is reused whatever the batch size or world size
CHUNK_IMAGES = 4096
#: bumped when alignment or input normalisation change: old caches are then never read
PIPELINE_VERSION = "ijb-v1 arcface112-float32 cv2-bilinear-border0 rgb v/127.5-1"

Chunk = Tuple[int, int]  # image index range [start, end)


class IJBError(ValueError):
    """Bad IJB input or cache (one line naming the file and line), the same on every rank."""


# -- the protocol files ------------------------------------------------------------------------

@dataclasses.dataclass
class Protocol:
    """The IJB meta files, joined by image name. ``N`` images to embed (in the order of the
    5-point file), ``F`` faces (lines of the template/media file), ``P`` template pairs."""

    root: Path
    target: str
    files: dict              # "faces" / "landmarks" / "pairs" -> Path of the meta file
    images: List[str]        # (N,) names under loose_crop/
    landmarks: np.ndarray    # (N, 5, 2) float32 pixels (x, y)
    det_scores: np.ndarray   # (N,) float32 detector scores
    face_image: np.ndarray   # (F,) int64 index into images
    face_template: np.ndarray  # (F,) int64 template id
    face_media: np.ndarray   # (F,) int64 media id
    pairs: np.ndarray        # (P, 2) int64 template ids (P = 0 when not loaded)
    labels: np.ndarray       # (P,) bool, True = same identity


def meta_file(root: Path, target: str, kind: str) -> Path:
    """``root/meta/<target>_<kind>.txt``, lower-case target first (as released), then upper."""
    candidates = [root / "meta" / f"{t}_{kind}.txt" for t in dict.fromkeys((target.lower(), target))]
    for path in candidates:
        if path.is_file():
            return path
    raise IJBError(f"missing IJB meta file {candidates[0]} (the standard layout: ROOT/meta/"
                   f"<target>_{{face_tid_mid,template_pair_label,name_5pts_score}}.txt and ROOT/loose_crop/)")


def _lines(path: Path):
    """``(line number, whitespace-split fields)`` of the non-blank lines of a text file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                yield number, fields


def read_face_tid_mid(path: Path) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(image names (F,), template ids (F,), media ids (F,), line numbers (F,))``."""
    names, ids, numbers = [], [], []
    for number, fields in _lines(path):
        try:
            if len(fields) != 3:
                raise ValueError
            ids.append((int(fields[1]), int(fields[2])))
        except ValueError:
            raise IJBError(f"{path}:{number}: expected 'IMAGE TEMPLATE_ID MEDIA_ID' (integer ids), "
                           f"got {' '.join(fields)[:80]!r}") from None
        names.append(fields[0])
        numbers.append(number)
    if not names:
        raise IJBError(f"{path}: no faces listed")
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1, 2)  # (F, 2)
    return names, ids_arr[:, 0], ids_arr[:, 1], np.asarray(numbers)


def read_name_5pts_score(path: Path) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(image names (N,), landmarks (N, 5, 2) float32, detector scores (N,) float32, line numbers)``.

    Landmarks and scores are parsed as float32, as the field's scripts do."""
    names, values, numbers = [], [], []
    for number, fields in _lines(path):
        try:
            if len(fields) != 12:
                raise ValueError(f"{len(fields)} fields")
            row = [float(v) for v in fields[1:]]
            if not all(math.isfinite(v) for v in row):
                raise ValueError("a value is not finite")
        except ValueError as exc:
            raise IJBError(f"{path}:{number}: expected 'IMAGE x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 SCORE' "
                           f"(12 fields), got {' '.join(fields)[:80]!r} ({exc})") from None
        names.append(fields[0])
        values.append(row)
        numbers.append(number)
    if not names:
        raise IJBError(f"{path}: no images listed")
    arr = np.asarray(values, dtype=np.float32)  # (N, 11)
    landmarks = arr[:, :10].reshape(-1, 5, 2)
    spread = landmarks.max(axis=1) - landmarks.min(axis=1)  # (N, 2)
    flat = np.flatnonzero(spread.max(axis=1) <= 1e-3)
    if flat.size:
        raise IJBError(f"{path}:{numbers[flat[0]]}: the 5 landmarks of {names[flat[0]]} coincide "
                       f"({flat.size} such line(s))")
    return names, landmarks, arr[:, 10].copy(), np.asarray(numbers)


def read_template_pairs(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(pairs (P, 2) int64 template ids, labels (P,) bool)`` (np.loadtxt: ~10 s for IJB-C)."""
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)  # (P, 3)
    except ValueError as exc:
        raise IJBError(f"{path}: expected 'TEMPLATE_1 TEMPLATE_2 LABEL' integers per line: {exc}") from None
    if table.shape[0] == 0:
        raise IJBError(f"{path}: no pairs listed")
    if table.shape[1] != 3:
        raise IJBError(f"{path}: expected 3 columns 'TEMPLATE_1 TEMPLATE_2 LABEL', got {table.shape[1]}")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise IJBError(f"{path}: row {bad[0] + 1}: the label must be 0 or 1, got {table[bad[0], 2]}")
    return table[:, :2].copy(), table[:, 2] == 1


def _check_images_exist(folder: Path, names: Sequence[str], where: Callable[[int], str]) -> None:
    """Raise naming the first image of ``names`` missing from ``folder`` (one directory listing)."""
    if not folder.is_dir():
        raise IJBError(f"missing image folder {folder}")
    present = set(os.listdir(folder))
    missing = [i for i, n in enumerate(names)
               if n not in present and not ("/" in n and (folder / n).is_file())]
    if missing:
        raise IJBError(f"{folder / names[missing[0]]} does not exist (listed in {where(missing[0])}; "
                       f"{len(missing)} of {len(names)} images missing)")


def load_protocol(root: os.PathLike, target: str, with_pairs: bool = True) -> Protocol:
    """Read and cross-check the meta files of ``root`` for ``target`` (IJBC / IJBB).

    Every face must have landmarks and an existing image; every template of a pair must have
    faces. Errors are :class:`IJBError` naming the file and line."""
    root, target = Path(root), target.upper()
    files = {"faces": meta_file(root, target, "face_tid_mid"),
             "landmarks": meta_file(root, target, "name_5pts_score"),
             "pairs": meta_file(root, target, "template_pair_label")}
    face_names, face_template, face_media, face_lines = read_face_tid_mid(files["faces"])
    names, landmarks, scores, lmk_lines = read_name_5pts_score(files["landmarks"])
    row: dict = {}
    for i, name in enumerate(names):
        if row.setdefault(name, i) != i:
            raise IJBError(f"{files['landmarks']}:{lmk_lines[i]}: image {name} is listed twice "
                           f"(first on line {lmk_lines[row[name]]})")
    face_row = np.array([row.get(n, -1) for n in face_names], dtype=np.int64)  # (F,) into names
    missing = np.flatnonzero(face_row < 0)
    if missing.size:
        raise IJBError(f"{files['faces']}:{face_lines[missing[0]]}: image {face_names[missing[0]]} has no "
                       f"landmarks in {files['landmarks']} ({missing.size} face(s) without)")
    used = np.unique(face_row)  # (N,) rows of the 5-point file, in its order
    images = [names[i] for i in used]
    _check_images_exist(root / "loose_crop", images,
                        lambda k: f"{files['landmarks']}:{lmk_lines[used[k]]}")
    pairs, labels = np.zeros((0, 2), np.int64), np.zeros(0, bool)
    if with_pairs:
        pairs, labels = read_template_pairs(files["pairs"])
        known = np.isin(pairs, np.unique(face_template))  # (P, 2)
        if not known.all():
            r, c = np.argwhere(~known)[0]
            n_missing = np.unique(pairs[~known]).size
            raise IJBError(f"{files['pairs']}: row {r + 1}: template {pairs[r, c]} has no images in "
                           f"{files['faces']} ({n_missing} template(s) without)")
    return Protocol(root=root, target=target, files=files, images=images, landmarks=landmarks[used],
                    det_scores=scores[used], face_image=np.searchsorted(used, face_row),
                    face_template=face_template, face_media=face_media, pairs=pairs, labels=labels)


# -- images: read, align, normalise -----------------------------------------------------------

class AlignedFaces(torch.utils.data.Dataset):
    """Item ``k``: ``(image index, aligned image (C, S, S) float32 in [-1, 1], error or "")``
    for image ``indices[k]`` of the protocol. A file that cannot be decoded is reported in the
    third field (and raised by the reader in the main process, naming it)."""

    def __init__(self, protocol: Protocol, indices: np.ndarray, size: int, channels: int) -> None:
        self.folder = protocol.root / "loose_crop"
        self.images, self.landmarks = protocol.images, protocol.landmarks
        self.indices, self.size, self.channels = np.asarray(indices, dtype=np.int64), size, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        path = self.folder / self.images[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # (H, W, 3) uint8, BGR: the field's reader
        if bgr is None:
            return i, torch.zeros(self.channels, self.size, self.size), f"cannot decode image {path}"
        rgb = np.ascontiguousarray(align_face(bgr, self.landmarks[i], self.size)[:, :, ::-1])  # (S, S, 3)
        if self.channels == 1:  # a grey model: the conversion of training (Pillow's "L")
            rgb = np.asarray(Image.fromarray(rgb).convert("L"))  # (S, S)
        return i, to_float(rgb), ""


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # one image per worker at a time; OpenCV's own pool would oversubscribe


# -- models: a checkpoint's backbone or an ONNX file --------------------------------------------

class TorchEmbedder:
    """A backbone in eval mode on ``device``: ``(B, C, S, S)`` -> ``(B, d)`` float32 numpy."""

    def __init__(self, backbone: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = backbone.to(self.device).eval()
        self.channels, self.size = int(backbone.in_channels), int(backbone.image_size)
        digest = hashlib.sha256(type(backbone).__name__.encode())
        for name, tensor in sorted(backbone.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.model(x.to(self.device, non_blocking=True)).float().cpu().numpy()  # (B, d)


class OnnxEmbedder:
    """An ONNX model (input ``(B, C, S, S)``, output ``(B, d)``) in onnxruntime. A static batch
    size is honoured by running sub-batches of that size (the last one zero-padded; its padding
    rows are dropped)."""

    def __init__(self, path: os.PathLike, device: str = "cpu") -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise IJBError(f"ONNX model {path} does not exist")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = torch.device(device).index or 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise IJBError(f"cannot load ONNX model {path}: {' '.join(str(exc).split())[:200]}") from None
        inp = self.session.get_inputs()[0]
        batch, channels, height, width = (list(inp.shape) + [None] * 4)[:4]
        if not all(isinstance(v, int) for v in (channels, height, width)) or height != width:
            raise IJBError(f"{path}: expected an input (B, C, S, S) with fixed C and S, got {inp.shape}")
        self.input_name, self.channels, self.size = inp.name, channels, height
        self.static_batch = batch if isinstance(batch, int) and batch > 0 else None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                digest.update(block)
        self.fingerprint = digest.hexdigest()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x_np = x.numpy().astype(np.float32, copy=False)  # (B, C, S, S)
        if self.static_batch is None:
            return self.session.run(None, {self.input_name: x_np})[0].astype(np.float32)  # (B, d)
        step, out = self.static_batch, []
        for start in range(0, len(x_np), step):
            part = x_np[start: start + step]
            padded = np.concatenate([part, np.zeros((step - len(part),) + part.shape[1:], np.float32)])
            out.append(self.session.run(None, {self.input_name: padded})[0][: len(part)])
        return np.concatenate(out).astype(np.float32)


def embed_with_mirror(embedder, x: torch.Tensor) -> np.ndarray:
    """``(B, C, S, S)`` -> ``(B, 2, d)`` float32: embeddings of each image and of its mirror
    (one forward of the ``2B`` images; in eval mode every output row depends on its input only)."""
    both = embedder(torch.cat([x, torch.flip(x, dims=[-1])]))  # (2B, d)
    return np.stack([both[: len(x)], both[len(x):]], axis=1)


# -- the feature cache --------------------------------------------------------------------------

def cache_key(protocol: Protocol, embedder) -> str:
    """A 20-hex-digit fingerprint of what the raw embeddings depend on: the pipeline version, the
    model's weights and input size, the image names and their landmarks."""
    digest = hashlib.sha256(f"{PIPELINE_VERSION}|{embedder.fingerprint}|{embedder.channels}x"
                            f"{embedder.size}|".encode())
    digest.update("\n".join(protocol.images).encode())
    digest.update(np.ascontiguousarray(protocol.landmarks, dtype=np.float32).tobytes())
    return digest.hexdigest()[:20]


def chunk_ranges(n: int, chunk: int) -> List[Chunk]:
    """``[(0, chunk), (chunk, 2 chunk), ..., (., n)]``."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def chunk_file(folder: Path, chunk: Chunk) -> Path:
    return folder / f"feat_{chunk[0]:08d}_{chunk[1]:08d}.npy"


def chunk_is_complete(path: Path, n: int) -> bool:
    """Whether ``path`` is a whole ``(n, 2, d)`` float32 array (reads the .npy header only)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            header_end = f.tell()
    except (OSError, ValueError):
        return False
    return (len(shape) == 3 and shape[:2] == (n, 2) and dtype == np.float32
            and path.stat().st_size == header_end + 4 * n * 2 * shape[2])


def write_chunk(path: Path, features: np.ndarray) -> None:
    """Write ``features`` ``(n, 2, d)`` atomically: a crash never leaves a partial chunk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float32))
    os.replace(tmp, path)


def read_chunk(path: Path, n: int) -> np.ndarray:
    """The ``(n, 2, d)`` float32 raw embeddings of one chunk."""
    if not chunk_is_complete(path, n):
        raise IJBError(f"feature cache chunk {path} is missing or damaged: delete it and run again")
    return np.load(path)


def prepare_cache(folder: Path, protocol: Protocol, embedder, chunks: Sequence[Chunk]) -> List[Chunk]:
    """Create ``folder`` with its ``manifest.json``; return the chunks not yet complete in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".feat_*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    manifest = {"pipeline": PIPELINE_VERSION, "target": protocol.target, "root": str(protocol.root),
                "model_fingerprint": embedder.fingerprint, "input": [embedder.channels, embedder.size,
                                                                     embedder.size],
                "images": len(protocol.images), "chunk_files": "feat_<start>_<end>.npy: (end - start, 2, d) "
                "float32 raw embeddings of images [start, end) and their mirrors"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return [c for c in chunks if not chunk_is_complete(chunk_file(folder, c), c[1] - c[0])]


# -- embedding: this rank's share of the missing chunks -----------------------------------------

def embed_chunks(protocol: Protocol, embedder, folder: Path, chunks: Sequence[Chunk], batch_size: int,
                 workers: int = 0, progress: bool = True,
                 on_chunk: Optional[Callable[[Chunk], None]] = None) -> int:
    """Embed the images of ``chunks`` (and their mirrors) into the cache; returns how many chunks
    were written. Batches run across chunk boundaries; a chunk is written once all its images are
    in, then ``on_chunk(chunk)`` is called (a hook for tests)."""
    from tqdm import tqdm

    if not chunks:
        return 0
    indices = np.concatenate([np.arange(s, e) for s, e in chunks])  # (n,) in chunk order
    dataset = AlignedFaces(protocol, indices, embedder.size, embedder.channels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         worker_init_fn=_worker_init if workers else None,
                                         pin_memory=str(getattr(embedder, "device", "cpu")).startswith("cuda"))
    pending = list(chunks)
    buffer: Optional[np.ndarray] = None  # (chunk length, 2, d) of pending[0]
    filled, written, expected = 0, 0, 0
    bar = tqdm(total=len(indices), unit="img", desc=f"{protocol.target} embed", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    try:
        for index, x, errors in loader:
            failed = [e for e in errors if e]
            if failed:
                raise IJBError(f"{failed[0]} ({len(failed)} in this batch of {len(errors)})")
            if not np.array_equal(index.numpy(), indices[expected: expected + len(index)]):
                raise RuntimeError("the image loader returned images out of order")
            expected += len(index)
            raw = embed_with_mirror(embedder, x)  # (b, 2, d)
            pos = 0
            while pos < len(raw):
                start, end = pending[0]
                if buffer is None:
                    buffer = np.empty((end - start, 2, raw.shape[2]), np.float32)
                take = min(len(raw) - pos, len(buffer) - filled)
                buffer[filled: filled + take] = raw[pos: pos + take]
                filled, pos = filled + take, pos + take
                if filled == len(buffer):
                    write_chunk(chunk_file(folder, pending[0]), buffer)
                    written, done, buffer, filled = written + 1, pending.pop(0), None, 0
                    if on_chunk is not None:
                        on_chunk(done)
            bar.update(len(index))
    finally:
        bar.close()
    return written


# -- pooling: image features -> template features -> pair scores -> TAR@FAR ----------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """The field's switches: ``norm`` (N1 keeps the image feature's norm; N0 L2-normalises it),
    ``detector`` (D1 multiplies it by the detector score), ``flip`` (F1 adds the mirror's embedding)."""

    norm: bool = True
    detector: bool = True
    flip: bool = True

    @property
    def name(self) -> str:
        return f"N{int(self.norm)}D{int(self.detector)}F{int(self.flip)}"


def image_features(raw: np.ndarray, det_scores: np.ndarray, setting: Setting = Setting()) -> np.ndarray:
    """``(n, 2, d)`` raw embeddings (image, mirror) + ``(n,)`` detector scores -> ``(n, d)`` float64."""
    raw = np.asarray(raw, dtype=np.float64)
    feats = raw[:, 0] + raw[:, 1] if setting.flip else raw[:, 0].copy()  # (n, d)
    if not setting.norm:
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if setting.detector:
        feats *= np.asarray(det_scores, dtype=np.float64)[:, None]
    return feats


class TemplatePooler:
    """Template feature = sum over medias of the mean of the media's face features, fed a block
    of faces at a time in any order (memory: templates x d float64).

    Written as one weighted sum: face f adds ``feat_f / |faces of (template_f, media_f)|`` to its
    template's row (one ``index_add_`` per block)."""

    def __init__(self, face_template: np.ndarray, face_media: np.ndarray, dim: int) -> None:
        self.template_ids, self.row = np.unique(face_template, return_inverse=True)  # (T,), (F,)
        _, media_row = np.unique(face_media, return_inverse=True)  # (F,)
        key = self.row.astype(np.int64) * (int(media_row.max()) + 1) + media_row  # (F,) per (template, media)
        _, group, count = np.unique(key, return_inverse=True, return_counts=True)
        self.weight = 1.0 / count[group]  # (F,)
        self.sums = torch.zeros(len(self.template_ids), dim, dtype=torch.float64)  # (T, d)

    def add(self, faces: np.ndarray, feats: np.ndarray) -> None:
        """Add the features ``(k, d)`` of the faces ``faces`` ``(k,)`` (indices into the face list)."""
        weighted = np.asarray(feats, np.float64) * self.weight[faces, None]  # (k, d)
        self.sums.index_add_(0, torch.from_numpy(self.row[faces]), torch.from_numpy(weighted))

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(template ids (T,) sorted, L2-normalised template features (T, d) float64)``."""
        sums = self.sums.numpy()
        return self.template_ids, sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def pool_templates(face_feats: np.ndarray, face_template: np.ndarray,
                   face_media: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """All faces at once: ``(F, d)`` features -> ``(template ids (T,), features (T, d))``."""
    pooler = TemplatePooler(face_template, face_media, face_feats.shape[1])
    pooler.add(np.arange(len(face_feats)), face_feats)
    return pooler.result()


def pool_from_cache(protocol: Protocol, folder: Path, chunks: Sequence[Chunk],
                    setting: Setting) -> Tuple[np.ndarray, np.ndarray]:
    """:class:`TemplatePooler` over the cached chunks, one chunk in memory at a time."""
    order = np.argsort(protocol.face_image, kind="stable")  # faces by image index
    sorted_image = protocol.face_image[order]
    pooler = None
    for start, end in chunks:
        feats = image_features(read_chunk(chunk_file(folder, (start, end)), end - start),
                               protocol.det_scores[start:end], setting)  # (n, d)
        lo, hi = np.searchsorted(sorted_image, [start, end])
        faces = order[lo:hi]  # faces whose image is in [start, end)
        pooler = pooler or TemplatePooler(protocol.face_template, protocol.face_media, feats.shape[1])
        pooler.add(faces, feats[protocol.face_image[faces] - start])
    return pooler.result()


def pair_cosines(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                 block: int = 1 << 15) -> np.ndarray:
    """Cosine ``(P,)`` float64 of each template pair ``(P, 2)`` (features already L2-normalised;
    ``block`` pairs at a time bounds the memory)."""
    rows = np.searchsorted(template_ids, pairs)  # (P, 2)
    scores = np.empty(len(pairs))
    for s in range(0, len(pairs), block):
        a, b = template_feats[rows[s: s + block, 0]], template_feats[rows[s: s + block, 1]]
        scores[s: s + block] = np.einsum("pd,pd->p", a, b)
    return scores


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS) -> dict:
    """``{"tar@far=1e-6": ..., ..., "auc": ..., "notes": [...]}`` from
    :func:`launch.metrics.roc_metrics` (NaN where a FAR is below 1 / impostor pairs); no k-fold
    accuracy (171 s of the metric time for 15.7M pairs on 2 CPU cores, and not part of the protocol)."""
    if len(scores) < 2:
        raise IJBError(f"need at least 2 template pairs, got {len(scores)}")
    roc = roc_metrics(scores, labels, fars=fars)
    out = {far_key(far): roc[far_key(far)] for far in fars}
    out.update(auc=roc["auc"], notes=roc["notes"])
    return out


# -- report ------------------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """The TAR@FAR row as a text table (percent, two decimals; ``n/a`` = not resolvable)."""
    head = (f"{result['target']} 1:1 verification, {result['setting']}: {result['images']} images, "
            f"{result['templates']} templates, {result['pairs']} pairs ({result['genuine']} genuine, "
            f"{result['impostor']} impostor)")
    cells = [("FAR", "TAR (%)")]
    for far in FARS:
        v = result[far_key(far)]
        cells.append((f"{far:.0e}", "n/a" if v is None else f"{100 * v:.2f}"))
    widths = [max(len(a), len(b)) for a, b in cells]
    rows = ["  ".join(c[i].rjust(w) for c, w in zip(cells, widths)) for i in (0, 1)]
    foot = "n/a: fewer than 1/FAR impostor pairs, that FAR cannot be measured" if "n/a" in rows[1] else ""
    return "\n".join([head, *rows] + ([foot] if foot else []))


def plot_roc(scores: np.ndarray, labels: np.ndarray, result: dict, path: Path) -> None:
    """ROC (TAR against FAR, log FAR axis) with the reported points marked; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)  # corners only (collinear points dropped)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    left, resolved = min(FARS), 1.0 / max(result["impostor"], 1)  # smallest FAR the impostors measure
    label = Path(result["model"]).name or "model"
    # FAR 0 has no place on a log axis: the curve starts at the smallest measurable FAR
    ax.semilogx(np.maximum(fpr, resolved), tpr, lw=1.5, label=f"{label} (AUC {result['auc']:.4f})")
    if resolved > left:
        ax.axvspan(left, resolved, color="0.85", label="not measurable: < 1 impostor pair")
    for far in FARS:
        if result[far_key(far)] is not None:
            ax.plot(far, result[far_key(far)], "o", color="C1", ms=4)
            ax.annotate(f"{100 * result[far_key(far)]:.2f}", (far, result[far_key(far)]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(left, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(f"{result['target']} 1:1 verification, {result['setting']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_value(v):
    return None if isinstance(v, float) and math.isnan(v) else v


# -- one evaluation, on every rank of the group ------------------------------------------------

def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(error: Optional[str], extra=None) -> list:
    """All-gather ``(error, extra)`` of every rank; raise :class:`IJBError` on every rank when any
    rank had an error. Returns the ``extra`` of every rank (no collective on one rank)."""
    rank, world = _world()
    gathered = [(error, extra)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (error, extra))
    for r, (err, _) in enumerate(gathered):
        if err:
            raise IJBError(err if world == 1 or r == rank else f"rank {r}: {err}")
    return [e for _, e in gathered]


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate_ijb(root: os.PathLike, target: str, embedder, output: os.PathLike,
                 cache: Optional[os.PathLike] = None, batch_size: int = 256, workers: int = 0,
                 setting: Setting = Setting(), chunk_images: int = CHUNK_IMAGES, model_name: str = "",
                 progress: bool = True, on_chunk: Optional[Callable[[Chunk], None]] = None) -> Optional[dict]:
    """Run the protocol (module docstring) with ``embedder`` (:class:`TorchEmbedder` /
    :class:`OnnxEmbedder`); on every rank of the default group when one is initialised.

    Returns the result (also written to ``output/ijb_<target>.json``, with the ROC picture) on
    rank 0, ``None`` on the others. Collectives: 2 all-gathers and 1 broadcast of small objects."""
    rank, world = _world()
    target = target.upper()
    protocol, error = None, None
    try:
        protocol = load_protocol(root, target, with_pairs=rank == 0)
    except IJBError as exc:
        error = str(exc)
    agree(error)
    folder = Path(cache if cache is not None else Path(output) / "cache") / target / cache_key(protocol, embedder)
    chunks = chunk_ranges(len(protocol.images), chunk_images)
    todo = _broadcast(prepare_cache(folder, protocol, embedder, chunks) if rank == 0 else None)
    mine = todo[rank::world]  # strided: every rank gets about the same number of images
    error, written = None, 0
    try:
        written = embed_chunks(protocol, embedder, folder, mine, batch_size, workers,
                               progress=progress and rank == 0, on_chunk=on_chunk)
    except IJBError as exc:
        error = str(exc)
    written_per_rank = agree(error, written)  # also the barrier: every chunk is on disk after it
    if rank != 0:
        return None
    template_ids, template_feats = pool_from_cache(protocol, folder, chunks, setting)
    scores = pair_cosines(template_ids, template_feats, protocol.pairs)
    metrics = tar_at_far(scores, protocol.labels)
    n_pos = int(protocol.labels.sum())
    result = {"target": target, "setting": setting.name, "model": model_name, "images": len(protocol.images),
              "faces": len(protocol.face_image), "templates": len(template_ids), "pairs": len(scores),
              "genuine": n_pos, "impostor": len(scores) - n_pos,
              **{k: _json_value(v) for k, v in metrics.items()},
              "cache": {"folder": str(folder), "chunks": len(chunks), "computed": int(sum(written_per_rank)),
                        "computed_per_rank": [int(w) for w in written_per_rank],
                        "reused": len(chunks) - len(todo), "world_size": world}}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result["roc_png"] = str(out / f"ijb_{target}_roc.png")
    result["scores_npy"] = str(out / f"ijb_{target}_scores.npy")
    np.save(result["scores_npy"], scores)  # (P,) float64, in the order of the pair file
    plot_roc(scores, protocol.labels, result, Path(result["roc_png"]))
    (out / f"ijb_{target}.json").write_text(json.dumps(result, indent=1))
    return result


# -- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ijb", required=True, metavar="ROOT", help="the IJB-B or IJB-C folder (meta/, loose_crop/)")
    p.add_argument("--target", type=str.upper, choices=TARGETS, default="IJBC")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint folder of this project (…/checkpoints/step_XXXXXXXX)")
    model.add_argument("--onnx", help="an ONNX model: input (B, C, S, S) RGB in [-1, 1], output (B, d)")
    p.add_argument("--output", default=None, help="where the JSON and the ROC go (default: <checkpoint>/ijb, "
                                                  "or <model>_ijb beside the ONNX file)")
    p.add_argument("--cache", default=None, help="feature cache folder (default: <output>/cache)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward (x2 with mirrors)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image-reading processes per rank (0: in the main process)")
    p.add_argument("--chunk-images", type=_positive_int, default=CHUNK_IMAGES,
                   help="images per cache chunk (a different value re-embeds everything)")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--no-norm", action="store_true", help="N0: L2-normalise each image feature")
    p.add_argument("--no-detector-score", action="store_true", help="D0: do not weight by the detector score")
    p.add_argument("--no-flip", action="store_true", help="F0: do not add the mirror image's embedding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def load_embedder(args: argparse.Namespace, device: str):
    """``(embedder, model path)`` from ``--checkpoint`` or ``--onnx``."""
    if args.onnx:
        return OnnxEmbedder(args.onnx, device), args.onnx
    from launch.checkpoint import load_backbone

    try:
        backbone, _ = load_backbone(args.checkpoint, map_location="cpu")
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise IJBError(f"cannot load checkpoint {args.checkpoint}: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:200]}") from None
    return TorchEmbedder(backbone, device), args.checkpoint


def default_output(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    if args.checkpoint:
        return Path(args.checkpoint) / "ijb"
    onnx = Path(args.onnx)
    return onnx.with_name(f"{onnx.stem}_ijb")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: 0 on success; 1 with one line on stderr for bad input (no traceback)."""
    from launch.distributed import setup_distributed, teardown

    args = build_parser().parse_args(argv)
    had_group = dist.is_available() and dist.is_initialized()
    rank, _, local_rank = setup_distributed()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    setting = Setting(norm=not args.no_norm, detector=not args.no_detector_score, flip=not args.no_flip)
    try:
        embedder, model, error = None, None, None
        try:
            embedder, model = load_embedder(args, device)
        except IJBError as exc:
            error = str(exc)
        agree(error)
        result = evaluate_ijb(args.ijb, args.target, embedder, default_output(args), cache=args.cache,
                              batch_size=args.batch_size, workers=max(0, args.workers), setting=setting,
                              chunk_images=args.chunk_images, model_name=model, progress=not args.no_progress)
    except IJBError as exc:  # the same on every rank (agreed): one line, from rank 0
        if rank == 0:
            print(f"evaluate --ijb: {exc}", file=sys.stderr)
        return 1
    finally:
        if not had_group:
            teardown()
    if result is not None:
        print(format_table(result))
        json_path = default_output(args) / f"ijb_{result['target']}.json"
        print(f"wrote {json_path} and {result['roc_png']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

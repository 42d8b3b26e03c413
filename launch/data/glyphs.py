"""Printed-kanji identities rendered from Debian's free CJK typefaces.

The default, fully offline data set of the training app. Every kanji is an
identity (class) and every distinct typeface design is one "photo" of it, so
the task looks like face recognition: many classes, a few samples each, and
open-set evaluation on kanji held out of training.

Preparation (:func:`prepare_glyphs`, run once, then cached):

1. ``apt-get download`` the font packages of :data:`FONT_PACKAGES` into
   ``<cache_dir>/debs`` and unpack them with ``dpkg -x`` into
   ``<cache_dir>/fonts`` (no system install). A package that fails is skipped.
2. Collect every ``.ttf`` / ``.otf`` / ``.ttc`` face (each index of a ``.ttc``).
   Faces Pillow cannot open are skipped.
3. Render a common sample of characters with every face and merge faces whose
   renders differ by a mean absolute pixel difference below
   ``dedupe_threshold`` (pixels in [0, 1]): they are one design, and the face
   covering the most characters is kept.
4. Render every character each kept design has (fontTools ``cmap`` lookup;
   blank renders and renders equal to the face's ``.notdef`` box are dropped),
   white glyph on black, scaled to fit and centred in a ``size x size`` image.
5. Save ``<cache_dir>/glyphs_<charset>_<size>.npz``; later runs reuse it.

Loading (:func:`load_glyphs`) keeps only characters present in at least
``min_designs`` designs; :func:`split_glyphs` then splits identities
deterministically into training classes and held-out (open-set) classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from .transforms import to_float

log = logging.getLogger(__name__)

#: Debian packages whose fonts are rendered (about 184 MB of .deb files).
FONT_PACKAGES: Tuple[str, ...] = (
    "fonts-noto-cjk", "fonts-ipafont-gothic", "fonts-ipafont-mincho",
    "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho", "fonts-wqy-zenhei",
    "fonts-wqy-microhei", "fonts-vlgothic", "fonts-mplus", "fonts-horai-umefont",
    "fonts-seto", "fonts-kiloji", "fonts-kouzan-mouhitsu", "fonts-aoyagi-kouzan-t",
    "fonts-aoyagi-soseki", "fonts-yozvox-yozfont-standard-kana", "fonts-konatu",
    "fonts-monapo", "fonts-mona", "fonts-misaki", "fonts-dejima-mincho",
    "fonts-oradano-mincho-gsrr", "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi",
    "fonts-sawarabi-gothic", "fonts-reggae",
)

#: JIS X 0208 row ranges (inclusive) of the named character sets.
CHARSETS: Dict[str, Tuple[int, int]] = {
    "jis1": (16, 47),  # level 1 kanji: 2,965
    "jis": (16, 84),  # level 1 + level 2 kanji: 6,355
}

FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
CACHE_VERSION = 1


# --------------------------------------------------------------------------- chars
def jis_kanji(charset: str = "jis1") -> List[str]:
    """Kanji of a JIS X 0208 character set, in JIS order.

    A JIS X 0208 character at row ``r``, cell ``c`` (1..94) is the EUC-JP byte
    pair ``(0xA0 + r, 0xA0 + c)``; the kanji occupy rows 16-47 (level 1, whose
    last row is only partly used) and 48-84 (level 2). Byte pairs that do not
    decode are unassigned cells.
    """
    if charset not in CHARSETS:
        raise ValueError(f"unknown charset {charset!r}; expected one of {sorted(CHARSETS)}")
    first, last = CHARSETS[charset]
    chars: List[str] = []
    for row in range(first, last + 1):
        for cell in range(1, 95):
            try:
                chars.append(bytes((0xA0 + row, 0xA0 + cell)).decode("euc_jp"))
            except UnicodeDecodeError:
                continue
    return chars


def _resolve_charset(charset: Union[str, Sequence[str]]) -> Tuple[str, List[str]]:
    """(name used in the cache file name, list of characters)."""
    if isinstance(charset, str):
        return charset, jis_kanji(charset)
    chars = list(dict.fromkeys(charset))  # unique, order kept
    if not chars or any(len(c) != 1 for c in chars):
        raise ValueError("a custom charset must be a non-empty sequence of single characters")
    digest = hashlib.sha1("".join(chars).encode("utf-8")).hexdigest()[:8]
    return f"custom-{digest}", chars


def default_cache_dir() -> Path:
    """``$PARTIALFC_GLYPH_CACHE``, else ``$XDG_CACHE_HOME/partialfc/glyphs``
    (``~/.cache/partialfc/glyphs``)."""
    env = os.environ.get("PARTIALFC_GLYPH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "partialfc" / "glyphs"


def cache_path(cache_dir: Union[str, Path], charset: Union[str, Sequence[str]] = "jis1",
               size: int = 32) -> Path:
    """Path of the rendered-glyph cache for a charset and image size."""
    name, _ = _resolve_charset(charset)
    return Path(cache_dir) / f"glyphs_{name}_{size}.npz"


# --------------------------------------------------------------------------- fonts
def download_font_packages(deb_dir: Union[str, Path],
                           packages: Sequence[str] = FONT_PACKAGES) -> List[Path]:
    """``apt-get download`` each package into ``deb_dir``; returns the .deb files.

    Packages already downloaded are reused. A package that fails to download is
    skipped with a warning. If none can be located and we are root, ``apt-get
    update`` is run once and the failed ones are retried.
    """
    deb_dir = Path(deb_dir)
    deb_dir.mkdir(parents=True, exist_ok=True)

    def existing(pkg: str) -> Optional[Path]:
        found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        return found[-1] if found else None

    def fetch(pkg: str) -> Tuple[Optional[Path], str]:
        r = subprocess.run(["apt-get", "download", pkg], cwd=deb_dir,
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
        return existing(pkg), ""

    missing = [p for p in packages if existing(p) is None]
    if missing and shutil.which("apt-get") is None:
        log.warning("apt-get not found: cannot download %d font packages", len(missing))
        missing = []
    errors: Dict[str, str] = {}
    for pkg in missing:
        _, errors[pkg] = fetch(pkg)
    failed = [p for p in missing if existing(p) is None]
    if failed and len(failed) == len(missing) and hasattr(os, "geteuid") and os.geteuid() == 0:
        log.info("no package could be downloaded; running apt-get update once")
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        for pkg in failed:
            _, errors[pkg] = fetch(pkg)
    debs = []
    for pkg in packages:
        deb = existing(pkg)
        if deb is None:
            log.warning("skipping font package %s: %s", pkg, errors.get(pkg, "not downloaded"))
        else:
            debs.append(deb)
    return debs


def unpack_debs(debs: Iterable[Union[str, Path]], font_dir: Union[str, Path]) -> Path:
    """``dpkg -x`` every .deb into ``font_dir/<package>``; returns ``font_dir``."""
    font_dir = Path(font_dir)
    font_dir.mkdir(parents=True, exist_ok=True)
    for deb in map(Path, debs):
        dest = font_dir / deb.name.split("_", 1)[0]
        marker = dest / ".unpacked"
        if marker.exists():
            continue
        r = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("skipping %s: dpkg -x failed: %s", deb.name, r.stderr.strip())
            continue
        marker.write_text(deb.name)
    return font_dir


def find_font_files(root: Union[str, Path]) -> List[Path]:
    """Every .ttf/.otf/.ttc under ``root`` (symlinks resolved, identical files once)."""
    seen: Dict[str, Path] = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            p = Path(dirpath) / name
            if p.suffix.lower() not in FONT_SUFFIXES or not p.exists():
                continue
            real = p.resolve()
            digest = hashlib.sha1(real.read_bytes()).hexdigest()
            seen.setdefault(digest, real)
    return sorted(seen.values())


@dataclass(frozen=True)
class FaceRef:
    """One face of a font file (``index`` > 0 only inside a .ttc collection)."""

    path: str
    index: int = 0

    @property
    def name(self) -> str:
        """Short unique-ish name, ``<file name>#<index>``."""
        return f"{Path(self.path).name}#{self.index}"


def list_faces(files: Iterable[Union[str, Path]]) -> List[FaceRef]:
    """Expand font files into faces: one per file, one per index of a .ttc."""
    faces: List[FaceRef] = []
    for f in map(Path, files):
        count = 1
        with open(f, "rb") as fh:
            head = fh.read(12)
        if head[:4] == b"ttcf" and len(head) == 12:
            count = struct.unpack(">I", head[8:12])[0]  # numFonts, big-endian
        faces.extend(FaceRef(str(f), i) for i in range(count))
    return faces


def face_codepoints(face: FaceRef) -> set:
    """Code points mapped by the face's best ``cmap`` subtable (fontTools)."""
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    try:
        cmap = font.getBestCmap() or {}
        return set(cmap)
    finally:
        font.close()


# --------------------------------------------------------------------------- render
def load_face(face: FaceRef, size: int, oversample: int = 4) -> ImageFont.FreeTypeFont:
    """Open ``face`` with Pillow at ``size * oversample`` pixels (raises OSError)."""
    return ImageFont.truetype(face.path, size * oversample, index=face.index,
                              layout_engine=ImageFont.Layout.BASIC)


def render_glyph(font: ImageFont.FreeTypeFont, ch: str, size: int,
                 margin: int = 1) -> Optional[np.ndarray]:
    """Render ``ch`` white-on-black, scaled to fit and centred.

    The glyph is drawn at the font's (oversampled) size, cropped to its ink, and
    resized (aspect kept, area-averaged) so its longer side is ``size - 2*margin``.
    Returns uint8 ``(size, size)``, or None when the glyph has no ink.
    """
    em = int(font.size)
    canvas = 2 * em + 8
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text((canvas / 2, canvas / 2), ch, fill=255, font=font, anchor="mm")
    bbox = img.getbbox()
    if bbox is None:
        return None
    ink = img.crop(bbox)
    w, h = ink.size
    inner = size - 2 * margin
    scale = inner / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    ink = ink.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    out = Image.new("L", (size, size), 0)
    out.paste(ink, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


_NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no font maps


def render_face(face: FaceRef, chars: Sequence[str], size: int, oversample: int = 4,
                codepoints: Optional[set] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Render the characters of ``chars`` that ``face`` really has.

    A character is kept when the face's cmap maps it and its render has ink and
    differs from the face's ``.notdef`` box. Returns ``(idx, images)``: int64
    ``(M,)`` positions in ``chars`` and uint8 ``(M, size, size)`` renders.
    """
    font = load_face(face, size, oversample)
    cps = face_codepoints(face) if codepoints is None else codepoints
    notdef = None if ord(_NOTDEF_PROBE) in cps else render_glyph(font, _NOTDEF_PROBE, size)
    idx: List[int] = []
    imgs: List[np.ndarray] = []
    for i, ch in enumerate(chars):
        if ord(ch) not in cps:
            continue
        g = render_glyph(font, ch, size)
        if g is None or (notdef is not None and np.array_equal(g, notdef)):
            continue
        idx.append(i)
        imgs.append(g)
    images = np.stack(imgs) if imgs else np.zeros((0, size, size), np.uint8)
    return np.asarray(idx, dtype=np.int64), images


# --------------------------------------------------------------------------- dedupe
def dedupe_faces(samples: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 threshold: float = 0.03, min_common: int = 8,
                 order: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """Group faces whose renders are (nearly) the same design.

    Args:
        samples: per face, uint8 ``(K, H, W)`` renders of one common list of K
            characters (any content where the mask is False).
        masks: per face, bool ``(K,)``: the face has that character.
        threshold: two faces are one design when the mean absolute difference
            of their renders (pixels scaled to [0, 1]) over the characters both
            have is below this.
        min_common: faces sharing fewer sample characters are kept apart.
        order: preference order (first = kept as the representative); default
            most sample characters first, ties by position.

    Returns:
        ``(keep, assign)``: indices of the kept faces in preference order, and
        for every face the index (into ``keep``) of the design it belongs to.
    """
    n = len(samples)
    if order is None:
        order = sorted(range(n), key=lambda i: (-int(np.sum(masks[i])), i))
    keep: List[int] = []
    assign = [-1] * n
    for i in order:
        for d, j in enumerate(keep):
            common = masks[i] & masks[j]
            if int(common.sum()) < min_common:
                continue
            a = samples[i][common].astype(np.float32)
            b = samples[j][common].astype(np.float32)
            if float(np.abs(a - b).mean()) / 255.0 < threshold:
                assign[i] = d
                break
        else:
            assign[i] = len(keep)
            keep.append(i)
    return keep, assign


# --------------------------------------------------------------------------- workers
def _probe_task(face: FaceRef, chars: Sequence[str], sample: np.ndarray,
                size: int) -> Optional[dict]:
    """Worker: coverage of ``chars`` and renders of the ``sample`` positions."""
    try:
        font = load_face(face, size)
        cps = face_codepoints(face)
        family, style = font.getname()
        idx, imgs = render_face(face, [chars[i] for i in sample], size, codepoints=cps)
    except Exception as exc:  # noqa: BLE001 - any unreadable face is skipped
        return {"face": face, "error": f"{type(exc).__name__}: {exc}"}
    coverage = np.fromiter((ord(c) in cps for c in chars), dtype=bool, count=len(chars))
    mask = np.zeros(len(sample), dtype=bool)
    mask[idx] = True
    renders = np.zeros((len(sample), size, size), dtype=np.uint8)
    renders[idx] = imgs
    return {"face": face, "label": f"{family} {style}".strip(), "coverage": coverage,
            "mask": mask, "renders": renders}


def _render_task(face: FaceRef, chars: Sequence[str], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Worker: full render of one face."""
    return render_face(face, chars, size)


def _pool_context():
    """``fork`` on Linux (the workers only use Pillow/numpy/fontTools, never torch,
    and fork does not re-run the caller's ``__main__``); ``spawn`` elsewhere."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _run_tasks(fn: Callable, jobs: List[tuple], workers: int, desc: str,
               progress: bool) -> List:
    """Run ``fn(*job)`` for every job (in a process pool if workers > 1),
    returning results in job order, with a tqdm bar."""
    from tqdm.auto import tqdm

    results: List = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="face", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for k, job in enumerate(jobs):
                results[k] = fn(*job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as ex:
                futures = {ex.submit(fn, *job): k for k, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------- prepare
def prepare_glyphs(
    cache_dir: Optional[Union[str, Path]] = None,
    charset: Union[str, Sequence[str]] = "jis1",
    size: int = 32,
    *,
    font_files: Optional[Sequence[Union[str, Path]]] = None,
    packages: Sequence[str] = FONT_PACKAGES,
    workers: int = 2,
    dedupe_threshold: float = 0.03,
    dedupe_sample: int = 64,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the glyph cache and return its path.

    Args:
        cache_dir: where debs, fonts and the .npz live (default
            :func:`default_cache_dir`).
        charset: ``"jis1"`` (2,965 level-1 kanji), ``"jis"`` (6,355) or an
            explicit sequence of characters.
        size: output image side in pixels.
        font_files: use these font files instead of downloading packages.
        packages: Debian font packages to download when ``font_files`` is None.
        workers: render processes (1 = in this process).
        dedupe_threshold: mean absolute pixel difference (in [0, 1]) below which
            two faces are one design.
        dedupe_sample: number of characters rendered to compare faces.
        seed: seed of the dedupe character sample.
        force: rebuild even if the cache exists.
        progress: show tqdm progress bars.
    """
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name, chars = _resolve_charset(charset)
    out = cache_dir / f"glyphs_{name}_{size}.npz"
    if out.exists() and not force:
        log.info("reusing glyph cache %s", out)
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)

    if font_files is None:
        debs = download_font_packages(cache_dir / "debs", packages)
        font_dir = unpack_debs(debs, cache_dir / "fonts")
        font_files = find_font_files(font_dir)
        log.info("%d font packages, %d font files", len(debs), len(font_files))
    faces = list_faces(font_files)
    if not faces:
        raise RuntimeError("no font faces found: cannot build the glyph data set")

    # 1. probe: coverage + renders of a common character sample, per face.
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(chars), size=min(dedupe_sample, len(chars)), replace=False))
    probes = _run_tasks(_probe_task, [(f, chars, sample, size) for f in faces],
                        workers, "probe faces", progress)
    ok = []
    for p in probes:
        if "error" in p:
            log.warning("skipping face %s: %s", p["face"].name, p["error"])
        elif p["mask"].any() or p["coverage"].any():
            ok.append(p)
    if not ok:
        raise RuntimeError("no usable font face")

    # 2. dedupe designs on the sample, preferring faces that cover the most chars.
    order = sorted(range(len(ok)),
                   key=lambda i: (-int(ok[i]["coverage"].sum()), ok[i]["face"].name))
    keep, assign = dedupe_faces([p["renders"] for p in ok], [p["mask"] for p in ok],
                                threshold=dedupe_threshold, order=order)
    designs = [ok[i] for i in keep]

    # 3. full render of every kept design.
    rendered = _run_tasks(_render_task, [(p["face"], chars, size) for p in designs],
                          workers, "render designs", progress)
    # A design whose characters all turned out blank / .notdef is dropped.
    nonempty = [d for d, (idx, _) in enumerate(rendered) if len(idx) > 0]
    new_id = {d: k for k, d in enumerate(nonempty)}
    assign = [new_id.get(a, -1) for a in assign]
    designs = [designs[d] for d in nonempty]
    rendered = [rendered[d] for d in nonempty]
    if not rendered:
        raise RuntimeError("no font face has any character of the charset")
    per_char = np.zeros(len(chars), dtype=np.int64)
    for idx, _ in rendered:
        per_char[idx] += 1
    present = np.flatnonzero(per_char > 0)  # characters with >= 1 design
    remap = np.full(len(chars), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    images = np.concatenate([imgs for _, imgs in rendered])  # (N, H, W)
    labels = np.concatenate([remap[idx] for idx, _ in rendered])  # (N,)
    design = np.concatenate([np.full(len(idx), d, np.int64)
                             for d, (idx, _) in enumerate(rendered)])  # (N,)
    srt = np.lexsort((design, labels))  # by label, then design
    images, labels, design = images[srt], labels[srt], design[srt]

    elapsed = time.perf_counter() - t0
    meta = {"version": CACHE_VERSION, "charset": name, "size": size,
            "dedupe_threshold": dedupe_threshold, "dedupe_sample": int(len(sample)),
            "num_faces": len(faces), "num_usable_faces": len(ok),
            "num_designs": len(designs), "seconds": round(elapsed, 1)}
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp, images=images, labels=labels, design=design,
        chars=np.array([chars[i] for i in present]),
        faces=np.array([p["face"].name for p in designs]),
        face_labels=np.array([p["label"] for p in designs]),
        all_faces=np.array([p["face"].name for p in ok]),
        all_faces_design=np.array(assign, dtype=np.int64),
        meta=np.array(json.dumps(meta)),
    )
    os.replace(tmp, out)
    log.info("glyphs: %d faces (%d usable) -> %d designs after dedupe; %d of %d characters "
             "rendered, %d images; %.1f s; %s (%.1f MB)", len(faces), len(ok), len(designs),
             len(present), len(chars), len(images), elapsed, out, out.stat().st_size / 1e6)
    return out


# --------------------------------------------------------------------------- load / split
@dataclass
class GlyphSet:
    """Rendered glyphs: ``images`` uint8 (N, H, W), ``labels`` int64 (N,) in
    0..len(chars)-1, ``designs`` int64 (N,) in 0..len(faces)-1."""

    images: np.ndarray
    labels: np.ndarray
    designs: np.ndarray
    chars: List[str]
    faces: List[str]

    @property
    def num_classes(self) -> int:
        """Number of identities (characters)."""
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.labels)

    def subset_classes(self, classes: Sequence[int]) -> "GlyphSet":
        """Keep only ``classes`` (old labels), relabelled 0..len(classes)-1 in
        the given order."""
        classes = np.asarray(classes, dtype=np.int64)
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        sel = np.flatnonzero(remap[self.labels] >= 0)
        return GlyphSet(self.images[sel], remap[self.labels[sel]], self.designs[sel],
                        [self.chars[c] for c in classes], list(self.faces))


def load_glyphs(path: Union[str, Path], min_designs: int = 1) -> GlyphSet:
    """Load a glyph cache, keeping characters present in >= ``min_designs`` designs."""
    with np.load(path, allow_pickle=False) as z:
        gs = GlyphSet(z["images"], z["labels"].astype(np.int64), z["design"].astype(np.int64),
                      [str(c) for c in z["chars"]], [str(f) for f in z["faces"]])
    counts = np.bincount(gs.labels, minlength=gs.num_classes)  # designs per character
    return gs.subset_classes(np.flatnonzero(counts >= min_designs))


def split_classes(num_classes: int, heldout_classes: int = 300,
                  seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic seeded split of ``range(num_classes)`` into (train, heldout),
    each sorted ascending."""
    if not 0 <= heldout_classes < num_classes:
        raise ValueError(f"heldout_classes must be in [0, {num_classes}), got {heldout_classes}")
    perm = np.random.default_rng(seed).permutation(num_classes)
    return np.sort(perm[heldout_classes:]), np.sort(perm[:heldout_classes])


def split_glyphs(glyphs: GlyphSet, heldout_classes: int = 300,
                 seed: int = 0) -> Tuple[GlyphSet, GlyphSet]:
    """(train, heldout) glyph sets; each relabelled to 0..K-1."""
    train, held = split_classes(glyphs.num_classes, heldout_classes, seed)
    return glyphs.subset_classes(train), glyphs.subset_classes(held)


class GlyphDataset(Dataset):
    """``(image, label)`` pairs of a :class:`GlyphSet`.

    ``image`` is float32 (1, H, W) in [-1, 1] (black background = -1) after
    the optional ``transform`` (called as ``transform(image)``); ``label`` is
    an int64 scalar tensor.
    """

    def __init__(self, glyphs: GlyphSet,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.glyphs = glyphs
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of identities."""
        return self.glyphs.num_classes

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels, e.g. for samplers or pair building."""
        return self.glyphs.labels

    def __len__(self) -> int:
        return len(self.glyphs)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.glyphs.images[i])  # (1, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(int(self.glyphs.labels[i]), dtype=torch.int64)


def build_glyph_datasets(
    cache_dir: Optional[Union[str, Path]] = None,
    charset: Union[str, Sequence[str]] = "jis1",
    size: int = 32,
    min_designs: int = 4,
    heldout_classes: int = 300,
    seed: int = 0,
    train_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **prepare_kwargs,
) -> Tuple[GlyphDataset, GlyphDataset]:
    """Prepare (or reuse) the cache, filter, split, and wrap: (train, heldout).

    The held-out data set is never augmented (open-set evaluation).
    """
    path = prepare_glyphs(cache_dir, charset, size, **prepare_kwargs)
    glyphs = load_glyphs(path, min_designs)
    train, held = split_glyphs(glyphs, heldout_classes, seed)
    log.info("glyphs: %d kanji kept (>= %d designs each), %d designs, %d images; "
             "%d training classes (%d images), %d held-out classes (%d images)",
             glyphs.num_classes, min_designs, len(glyphs.faces), len(glyphs),
             train.num_classes, len(train), held.num_classes, len(held))
    return GlyphDataset(train, train_transform), GlyphDataset(held)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: ``python -m launch.data.glyphs [--cache-dir D] [--charset jis1] [--size 32]``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--charset", default="jis1", choices=sorted(CHARSETS))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = prepare_glyphs(args.cache_dir, args.charset, args.size,
                          workers=args.workers, force=args.force)
    gs = load_glyphs(path)
    print(f"{path}: {len(gs)} images, {gs.num_classes} characters, {len(gs.faces)} designs, "
          f"{path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    # Run through the package module so that pool workers pickle functions by
    # their importable name (launch.data.glyphs), not __main__.
    from launch.data import glyphs as _glyphs

    _glyphs.main()

"""Preparation of the glyph data set: fonts -> rendered, deduplicated cache file.

:func:`prepare_glyphs` (run once, then cached):

1. Get font files: download and unpack Debian font packages
   (:mod:`.glyph_fonts`, progress on stderr), or use given ``font_files``.
2. Probe every face in a process pool: its coverage of the charset and renders
   of a common character sample. Faces Pillow cannot open are skipped.
3. Merge faces whose sample renders differ by a mean absolute pixel difference
   below ``dedupe_threshold`` (:func:`.glyph_render.dedupe_faces`): they are one
   design, and the face covering the most characters is kept.
4. Render every character each kept design has (:func:`.glyph_render.render_face`).
5. Save ``<cache_dir>/glyphs_<charset>_<size>.npz``; later runs reuse it.

Loading, splitting and the Dataset live in :mod:`.glyphs`.
CLI: ``python -m launch.data.glyph_prepare [--cache-dir D] [--charset jis1] [--size 32]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .glyph_fonts import FONT_PACKAGES, FaceRef, Fetcher, face_codepoints, list_faces, package_font_files
from .glyph_render import dedupe_faces, load_face, render_face

log = logging.getLogger(__name__)

#: JIS X 0208 row ranges (inclusive) of the named character sets.
CHARSETS: Dict[str, Tuple[int, int]] = {
    "jis1": (16, 47),  # level 1 kanji: 2,965
    "jis": (16, 84),  # level 1 + level 2 kanji: 6,355
}

CACHE_VERSION = 1


# --------------------------------------------------------------------------- chars / paths
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


def cache_path(cache_dir: Optional[Union[str, Path]] = None,
               charset: Union[str, Sequence[str]] = "jis1", size: int = 32) -> Path:
    """Path of the rendered-glyph cache for a charset and image size
    (``cache_dir`` None: :func:`default_cache_dir`)."""
    return _cache_file(cache_dir, _resolve_charset(charset)[0], size)


def _cache_file(cache_dir: Optional[Union[str, Path]], name: str, size: int) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"glyphs_{name}_{size}.npz"


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


# --------------------------------------------------------------------------- steps
def _usable(probes: List[dict]) -> List[dict]:
    """Probes of faces that opened and have any character (others are logged)."""
    ok = []
    for p in probes:
        if "error" in p:
            log.warning("skipping face %s: %s", p["face"].name, p["error"])
        elif p["mask"].any() or p["coverage"].any():
            ok.append(p)
    if not ok:
        raise RuntimeError("no usable font face")
    return ok


def _pick_designs(ok: List[dict], threshold: float) -> Tuple[List[dict], List[int]]:
    """Dedupe on the sample renders, preferring faces that cover the most
    characters: (kept probes, design index of every probe of ``ok``)."""
    order = sorted(range(len(ok)),
                   key=lambda i: (-int(ok[i]["coverage"].sum()), ok[i]["face"].name))
    keep, assign = dedupe_faces([p["renders"] for p in ok], [p["mask"] for p in ok],
                                threshold=threshold, order=order)
    return [ok[i] for i in keep], assign


def _drop_empty(designs: List[dict], rendered: List[tuple], assign: List[int]):
    """Drop designs whose characters all turned out blank / .notdef; renumber
    ``assign`` (-1 for faces of a dropped design)."""
    nonempty = [d for d, (idx, _) in enumerate(rendered) if len(idx) > 0]
    if not nonempty:
        raise RuntimeError("no font face has any character of the charset")
    new_id = {d: k for k, d in enumerate(nonempty)}
    return ([designs[d] for d in nonempty], [rendered[d] for d in nonempty],
            [new_id.get(a, -1) for a in assign])


def _assemble(rendered: List[tuple], chars: Sequence[str]) -> Dict[str, np.ndarray]:
    """Concatenate the renders: images (N, H, W), labels (N,) over the characters
    some design has, design (N,), sorted by label then design; and those chars."""
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
    return {"images": images[srt], "labels": labels[srt], "design": design[srt],
            "chars": np.array([chars[i] for i in present])}


def _render_designs(faces: List[FaceRef], chars: Sequence[str], size: int, sample_size: int,
                    threshold: float, seed: int, workers: int, progress: bool):
    """Probe every face, dedupe designs on a seeded character sample, render the
    kept designs: (usable probes, design probes, design of every usable probe, renders)."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(chars), size=min(sample_size, len(chars)), replace=False))
    ok = _usable(_run_tasks(_probe_task, [(f, chars, sample, size) for f in faces],
                            workers, "probe faces", progress))
    designs, assign = _pick_designs(ok, threshold)
    rendered = _run_tasks(_render_task, [(p["face"], chars, size) for p in designs],
                          workers, "render designs", progress)
    designs, rendered, assign = _drop_empty(designs, rendered, assign)
    return ok, designs, assign, rendered


def _save(out: Path, arrays: Dict[str, np.ndarray], ok: List[dict], designs: List[dict],
          assign: List[int], meta: dict) -> None:
    """Write the cache .npz atomically (temporary file, then rename)."""
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays, faces=np.array([p["face"].name for p in designs]),
                        face_labels=np.array([p["label"] for p in designs]),
                        all_faces=np.array([p["face"].name for p in ok]),
                        all_faces_design=np.array(assign, dtype=np.int64),
                        meta=np.array(json.dumps(meta)))
    os.replace(tmp, out)


# --------------------------------------------------------------------------- prepare
def prepare_glyphs(
    cache_dir: Optional[Union[str, Path]] = None,
    charset: Union[str, Sequence[str]] = "jis1",
    size: int = 32,
    *,
    font_files: Optional[Sequence[Union[str, Path]]] = None,
    packages: Sequence[str] = FONT_PACKAGES,
    fetch: Optional[Fetcher] = None,
    workers: int = 2,
    dedupe_threshold: float = 0.03,
    dedupe_sample: int = 64,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the glyph cache and return its path.

    Args:
        cache_dir: where debs, fonts and the .npz live (default :func:`default_cache_dir`).
        charset: ``"jis1"`` (2,965 level-1 kanji), ``"jis"`` (6,355) or an
            explicit sequence of characters.
        size: output image side in pixels.
        font_files: use these font files instead of downloading packages.
        packages: Debian font packages to download when ``font_files`` is None.
        fetch: downloads one package (default ``apt-get download``), see
            :data:`.glyph_fonts.Fetcher`.
        workers: render processes (1 = in this process).
        dedupe_threshold: mean absolute pixel difference (in [0, 1]) below which
            two faces are one design.
        dedupe_sample: number of characters rendered to compare faces.
        seed: seed of the dedupe character sample.
        force: rebuild even if the cache exists.
        progress: show progress bars (download, probe, render) on stderr.

    Longer than a screen: the steps run in order and share the cache paths; each step is a call.
    """
    t0 = time.perf_counter()
    name, chars = _resolve_charset(charset)
    out = _cache_file(cache_dir, name, size)
    if out.exists() and not force:
        log.info("reusing glyph cache %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if font_files is None:
        font_files = package_font_files(out.parent, packages, fetch=fetch, progress=progress)
    faces = list_faces(font_files)
    if not faces:
        raise RuntimeError("no font faces found: cannot build the glyph data set")
    ok, designs, assign, rendered = _render_designs(faces, chars, size, dedupe_sample, dedupe_threshold,
                                                    seed, workers, progress)
    arrays = _assemble(rendered, chars)
    meta = {"version": CACHE_VERSION, "charset": name, "size": size,
            "dedupe_threshold": dedupe_threshold, "dedupe_sample": min(dedupe_sample, len(chars)),
            "num_faces": len(faces), "num_usable_faces": len(ok), "num_designs": len(designs),
            "seconds": round(time.perf_counter() - t0, 1)}
    _save(out, arrays, ok, designs, assign, meta)
    log.info("glyphs: %d faces (%d usable) -> %d designs after dedupe; %d of %d characters "
             "rendered, %d images; %.1f s; %s (%.1f MB)", len(faces), len(ok), len(designs),
             len(arrays["chars"]), len(chars), len(arrays["images"]), meta["seconds"], out,
             out.stat().st_size / 1e6)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: ``python -m launch.data.glyph_prepare [--cache-dir D] [--charset jis1] [--size 32]``."""
    import argparse

    from .glyphs import load_glyphs

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
    # their importable name (launch.data.glyph_prepare), not __main__.
    from launch.data import glyph_prepare as _prepare

    _prepare.main()

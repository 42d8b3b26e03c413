"""Font sources of the glyph data set: Debian font packages, font files and faces.

1. ``apt-get download`` the packages of :data:`FONT_PACKAGES` into a folder
   (:func:`download_font_packages`; about 176 MB on the first run, with a
   progress bar on stderr and one log line per package) and unpack them with
   ``dpkg -x`` (:func:`unpack_debs`; no system install, no root).
2. Collect every ``.ttf`` / ``.otf`` / ``.ttc`` file (:func:`find_font_files`)
   and expand them into faces, one per index of a ``.ttc`` (:func:`list_faces`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

#: Debian packages whose fonts are rendered (about 176 MB of .deb files).
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

FONT_SUFFIXES = (".ttf", ".otf", ".ttc")

#: ``fetch(package, deb_dir)`` puts ``<package>_*.deb`` into ``deb_dir`` and
#: returns "" on success or a one-line error message.
Fetcher = Callable[[str, Path], str]


# --------------------------------------------------------------------------- download
def apt_download(pkg: str, deb_dir: Path) -> str:
    """The default :data:`Fetcher`: ``apt-get download <pkg>`` in ``deb_dir``."""
    r = subprocess.run(["apt-get", "download", pkg], cwd=deb_dir, capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def _existing(deb_dir: Path, pkg: str) -> Optional[Path]:
    """The newest downloaded ``<pkg>_*.deb`` in ``deb_dir``, or None."""
    found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
    return found[-1] if found else None


def _fetch_all(missing: Sequence[str], deb_dir: Path, fetch: Fetcher,
               progress: bool) -> Dict[str, str]:
    """Fetch each package, reporting progress (tqdm bar on stderr + a log line
    per package with its size and the running total). Returns {package: error}."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    errors: Dict[str, str] = {}
    total_mb, t0 = 0.0, time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(missing), desc="download fonts", unit="pkg",
                                       file=sys.stderr, disable=not progress) as bar:
        for k, pkg in enumerate(missing, 1):
            bar.set_postfix_str(pkg)
            errors[pkg] = fetch(pkg, deb_dir)
            deb = _existing(deb_dir, pkg)
            mb = deb.stat().st_size / 1e6 if deb is not None else 0.0
            total_mb += mb
            got = f"{mb:.1f} MB" if deb is not None else "failed"
            bar.set_postfix_str(f"{pkg} {got}, total {total_mb:.1f} MB")
            bar.update()
            log.info("font package %d/%d %s: %s (total %.1f MB, %.0f s)", k, len(missing), pkg,
                     got if deb is not None else f"failed: {errors[pkg]}", total_mb,
                     time.perf_counter() - t0)
    return errors


def _apt_update_and_retry(failed: Sequence[str], deb_dir: Path, progress: bool) -> Dict[str, str]:
    """As root, run ``apt-get update`` once and fetch ``failed`` again."""
    log.info("no package could be downloaded; running apt-get update once")
    subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    return _fetch_all(failed, deb_dir, apt_download, progress)


def download_font_packages(deb_dir: Union[str, Path], packages: Sequence[str] = FONT_PACKAGES,
                           *, fetch: Optional[Fetcher] = None, progress: bool = True) -> List[Path]:
    """Download each package into ``deb_dir``; returns the .deb files (package order).

    Packages already downloaded are reused. ``fetch`` (default :func:`apt_download`)
    gets one package. Progress goes to stderr (``progress=False``: log lines only).
    A package that fails is skipped with a warning. If none of the default
    downloads succeeds and we are root, ``apt-get update`` is run once and they
    are retried.
    """
    deb_dir = Path(deb_dir)
    deb_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _existing(deb_dir, p) is None]
    if fetch is None and missing and shutil.which("apt-get") is None:
        log.warning("apt-get not found: cannot download %d font packages", len(missing))
        missing = []
    errors = _fetch_all(missing, deb_dir, fetch or apt_download, progress)
    failed = [p for p in missing if _existing(deb_dir, p) is None]
    if fetch is None and failed and len(failed) == len(missing) and _is_root():
        errors.update(_apt_update_and_retry(failed, deb_dir, progress))
    debs = []
    for pkg in packages:
        deb = _existing(deb_dir, pkg)
        if deb is None:
            log.warning("skipping font package %s: %s", pkg, errors.get(pkg) or "not downloaded")
        else:
            debs.append(deb)
    return debs


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- unpack / files
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


def package_font_files(cache_dir: Path, packages: Sequence[str] = FONT_PACKAGES, *,
                       fetch: Optional[Fetcher] = None, progress: bool = True) -> List[Path]:
    """Download (or reuse) and unpack the packages under ``cache_dir``
    (``debs/``, ``fonts/``); returns their font files."""
    debs = download_font_packages(cache_dir / "debs", packages, fetch=fetch, progress=progress)
    files = find_font_files(unpack_debs(debs, cache_dir / "fonts"))
    log.info("%d font packages, %d font files", len(debs), len(files))
    return files


# --------------------------------------------------------------------------- faces
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

"""Rendering glyphs and merging faces that are one typeface design.

* :func:`render_glyph` draws one character white on black, scaled to fit and
  centred in a ``size x size`` image.
* :func:`render_face` renders the characters a face really has (fontTools
  ``cmap`` lookup; blank renders and renders equal to the face's ``.notdef``
  box are dropped).
* :func:`dedupe_faces` groups faces whose renders differ by a mean absolute
  pixel difference below a threshold: they are one design.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .glyph_fonts import FaceRef, face_codepoints


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

"""Glyph data set: charsets, rendering, missing-glyph detection, dedupe, cache, split.

Uses the DejaVu / Computer Modern fonts that matplotlib ships (no download);
the real kanji cache is only checked when it already exists on this machine.
"""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data import glyph_fonts as F
from launch.data import glyph_prepare as P
from launch.data import glyph_render as R
from launch.data import glyphs as G

matplotlib = pytest.importorskip("matplotlib")
MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
LATIN = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def font(name: str) -> Path:
    p = MPL_FONTS / name
    if not p.exists():
        pytest.skip(f"matplotlib font {name} not available")
    return p


# ----------------------------------------------------------------- charsets
def test_jis_level1_kanji_count_and_bounds():
    chars = P.jis_kanji("jis1")
    assert len(chars) == 2965
    assert len(set(chars)) == 2965
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in chars)  # CJK Unified Ideographs
    # JIS X 0208 row 16 cell 1 is U+4E9C, the last level-1 kanji (row 47 cell 51) U+8155.
    assert chars[0] == "\u4e9c" and chars[-1] == "\u8155"


def test_jis_all_kanji_count_and_superset():
    level1 = P.jis_kanji("jis1")
    allk = P.jis_kanji("jis")
    assert len(allk) == 6355
    assert allk[:2965] == level1
    assert allk[2965] == "\u5f0c"  # row 48 cell 1, first level-2 kanji
    assert allk[-1] == "\u7199"  # row 84 cell 6
    with pytest.raises(ValueError):
        P.jis_kanji("big5")


# ----------------------------------------------------------------- rendering
def ink_bbox(img: np.ndarray, thr: int = 40):
    rows = np.flatnonzero((img > thr).any(axis=1))
    cols = np.flatnonzero((img > thr).any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize("ch", ["O", "l", "-"])
def test_render_glyph_is_scaled_to_fit_and_centred(ch):
    size, margin = 24, 1
    f = R.load_face(F.FaceRef(str(font("DejaVuSans.ttf"))), size)
    img = R.render_glyph(f, ch, size, margin=margin)
    assert img.dtype == np.uint8 and img.shape == (size, size)
    r0, r1, c0, c1 = ink_bbox(img, thr=0)
    h, w = r1 - r0 + 1, c1 - c0 + 1
    assert abs(max(h, w) - (size - 2 * margin)) <= 1  # the longer side fills the box
    assert abs((r0 + r1) / 2 - (size - 1) / 2) <= 1.0  # centred
    assert abs((c0 + c1) / 2 - (size - 1) / 2) <= 1.0
    assert img.max() == 255 and img[0].max() == 0 and img[:, 0].max() == 0  # white on black


def test_render_glyph_blank_is_none():
    f = R.load_face(F.FaceRef(str(font("DejaVuSans.ttf"))), 16)
    assert R.render_glyph(f, " ", 16) is None


def test_render_face_drops_glyphs_the_face_lacks():
    face = F.FaceRef(str(font("DejaVuSans.ttf")))
    cps = F.face_codepoints(face)
    assert ord("A") in cps and ord("\u4e9c") not in cps
    idx, imgs = R.render_face(face, ["A", "\u4e9c", "B", "\ue000", " "], 16)
    assert idx.tolist() == [0, 2]  # kanji, private-use and blank dropped
    assert imgs.shape == (2, 16, 16) and imgs.dtype == np.uint8
    assert not np.array_equal(imgs[0], imgs[1])
    # the cmap decides: a character it does not map is dropped even if renderable ...
    idx, _ = R.render_face(face, ["A", "B"], 16, codepoints={ord("A")})
    assert idx.tolist() == [0]
    # ... and a mapped character that renders as the .notdef box is dropped too
    idx, _ = R.render_face(face, ["\u4e9c", "B"], 16, codepoints={ord("\u4e9c"), ord("B")})
    assert idx.tolist() == [1]


def test_ttc_collection_faces_are_listed_and_rendered(tmp_path):
    from fontTools.ttLib import TTCollection, TTFont

    a, b = font("DejaVuSans.ttf"), font("DejaVuSerif.ttf")
    coll = TTCollection()
    coll.fonts = [TTFont(str(a)), TTFont(str(b))]
    ttc = tmp_path / "pair.ttc"
    coll.save(str(ttc))
    faces = F.list_faces([ttc, a])
    assert [(Path(f.path).name, f.index) for f in faces] == [
        ("pair.ttc", 0), ("pair.ttc", 1), ("DejaVuSans.ttf", 0)]
    _, from_ttc = R.render_face(faces[1], ["R", "g"], 20)
    _, direct = R.render_face(F.FaceRef(str(b)), ["R", "g"], 20)
    np.testing.assert_array_equal(from_ttc, direct)  # index 1 is the serif face


# ----------------------------------------------------------------- dedupe
def test_dedupe_faces_on_known_differences():
    rng = np.random.default_rng(0)
    k, h = 20, 8
    base = rng.integers(0, 256, (k, h, h)).astype(np.uint8)
    full = np.ones(k, bool)

    def shifted(delta):  # mean |diff| == delta / 255 exactly (no clipping)
        out = base.astype(np.int32) + delta
        out[base.astype(np.int32) + delta > 255] -= 2 * delta
        return out.astype(np.uint8)

    near = shifted(5)  # 5 / 255 ~ 0.020 < 0.03 -> same design
    far = shifted(10)  # 10 / 255 ~ 0.039 > 0.03 -> other design
    other = rng.integers(0, 256, (k, h, h)).astype(np.uint8)
    few = np.zeros(k, bool)
    few[:3] = True  # identical to base, but only 3 common characters
    samples = [base, near, far, other, base.copy()]
    masks = [full, full, full, full, few]
    keep, assign = R.dedupe_faces(samples, masks, threshold=0.03, min_common=8,
                                  order=[0, 1, 2, 3, 4])
    assert keep == [0, 2, 3, 4]
    assert assign == [0, 0, 1, 2, 3]
    # the default order prefers the face with more characters as representative
    keep2, assign2 = R.dedupe_faces([base, near], [np.arange(k) < 10, full])
    assert keep2 == [1] and assign2 == [0, 0]


# ----------------------------------------------------------------- prepare / cache
@pytest.fixture(scope="module")
def tiny_fonts(tmp_path_factory):
    d = tmp_path_factory.mktemp("fonts")
    shutil.copy(font("DejaVuSans.ttf"), d / "sans_copy.ttf")  # a duplicated design
    (d / "broken.ttf").write_bytes(b"\0\1\0\0" + b"not a font" * 20)  # Pillow fails
    return [font("DejaVuSans.ttf"), d / "sans_copy.ttf", font("DejaVuSerif.ttf"),
            font("DejaVuSans-Bold.ttf"), font("DejaVuSansMono.ttf"), d / "broken.ttf"]


@pytest.fixture(scope="module")
def tiny_cache(tiny_fonts, tmp_path_factory):
    cache = tmp_path_factory.mktemp("glyph_cache")
    path = P.prepare_glyphs(cache, LATIN + ["\u4e9c"], 16, font_files=tiny_fonts,
                            workers=1, progress=False)
    return path


def test_prepare_writes_expected_cache(tiny_cache):
    assert tiny_cache.name.startswith("glyphs_custom-") and tiny_cache.name.endswith("_16.npz")
    with np.load(tiny_cache, allow_pickle=False) as z:
        images, labels, design = z["images"], z["labels"], z["design"]
        chars, faces = list(z["chars"]), list(z["faces"])
        all_faces, all_design = list(z["all_faces"]), z["all_faces_design"].tolist()
        meta = json.loads(str(z["meta"]))
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16)
    assert labels.dtype == np.int64 and design.dtype == np.int64
    assert len(images) == len(labels) == len(design)
    # the kanji exists in no DejaVu face; every Latin character is in all 4 designs
    assert chars == LATIN
    assert len(faces) == 4 and meta["num_designs"] == 4
    assert len(images) == 4 * len(LATIN)
    assert set(zip(labels.tolist(), design.tolist())) == {
        (c, d) for c in range(len(LATIN)) for d in range(4)}
    # the byte-identical copy is merged with DejaVuSans; the broken file is skipped
    assert "broken.ttf#0" not in all_faces and meta["num_faces"] == 6
    assert all_design[all_faces.index("sans_copy.ttf#0")] == \
        all_design[all_faces.index("DejaVuSans.ttf#0")]
    assert len(set(all_design)) == 4


def test_prepare_reuses_cache(tiny_cache, tiny_fonts, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("should not render again")

    monkeypatch.setattr(P, "_run_tasks", boom)
    mtime = tiny_cache.stat().st_mtime_ns
    again = P.prepare_glyphs(tiny_cache.parent, LATIN + ["\u4e9c"], 16, font_files=tiny_fonts)
    assert again == tiny_cache and tiny_cache.stat().st_mtime_ns == mtime


def test_prepare_parallel_matches_serial(tiny_cache, tiny_fonts, tmp_path):
    par = P.prepare_glyphs(tmp_path, LATIN + ["\u4e9c"], 16, font_files=tiny_fonts,
                           workers=2, progress=False)
    with np.load(par) as a, np.load(tiny_cache) as b:
        for key in ("images", "labels", "design", "chars", "faces"):
            np.testing.assert_array_equal(a[key], b[key])


def build_deb(repo: Path, pkg: str, fonts) -> Path:
    """A real .deb (dpkg-deb, no root) holding ``fonts`` under /usr/share/fonts."""
    root = repo / "src" / pkg
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {pkg}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test fonts\n")
    dest = root / "usr" / "share" / "fonts" / "truetype" / pkg
    dest.mkdir(parents=True)
    for f in fonts:
        shutil.copy(f, dest)
    deb = repo / f"{pkg}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def test_font_download_reports_progress(tmp_path, monkeypatch, capfd, caplog):
    """The first run's download (~30 s for the real packages) shows progress on stderr
    and logs one line per package with its size; here from a local fake ``apt-get``."""
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("dpkg-deb / dpkg not available")
    repo, bindir = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir()
    bindir.mkdir()
    build_deb(repo, "fonts-test-sans", [font("DejaVuSans.ttf")])
    build_deb(repo, "fonts-test-serif", [font("DejaVuSerif.ttf")])
    fake = bindir / "apt-get"  # apt-get download PKG -> copy PKG_*.deb from the local repo
    fake.write_text('#!/bin/sh\n[ "$1" = download ] || exit 1\n'
                    'cp "$FAKE_APT_REPO/$2"_*.deb . 2>/dev/null || '
                    '{ echo "E: Unable to locate package $2" >&2; exit 100; }\n')
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_APT_REPO", str(repo))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.INFO)
    path = P.prepare_glyphs(tmp_path / "cache", LATIN[:12], 16, workers=1, progress=True,
                            packages=("fonts-test-sans", "fonts-missing", "fonts-test-serif"))
    err = capfd.readouterr().err
    assert "download fonts" in err and "3/3" in err and "fonts-test-serif" in err and " MB" in err
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("font package")]
    assert len(logged) == 3 and logged[0].startswith("font package 1/3 fonts-test-sans: 0.")
    assert "MB" in logged[0] and "Unable to locate package fonts-missing" in logged[1]
    with np.load(path) as z:
        assert len(z["faces"]) == 2 and list(z["chars"]) == LATIN[:12]


def write_synthetic_cache(path: Path):
    """chars a (designs 0,1,2), b (design 0), c (designs 1,2); pixel value = 10*label + design."""
    rows = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 1), (2, 2)]
    labels = np.array([r[0] for r in rows], np.int64)
    design = np.array([r[1] for r in rows], np.int64)
    images = np.stack([np.full((4, 4), 10 * c + d, np.uint8) for c, d in rows])
    np.savez(path, images=images, labels=labels, design=design, chars=np.array(["a", "b", "c"]),
             faces=np.array(["f0", "f1", "f2"]))


def test_load_glyphs_min_designs(tmp_path):
    p = tmp_path / "syn.npz"
    write_synthetic_cache(p)
    gs = G.load_glyphs(p, min_designs=2)
    assert gs.chars == ["a", "c"] and gs.num_classes == 2 and len(gs) == 5
    for img, lab, d in zip(gs.images, gs.labels, gs.designs):
        old = {"a": 0, "c": 2}[gs.chars[lab]]
        assert (img == 10 * old + d).all()
    assert G.load_glyphs(p, min_designs=3).chars == ["a"]
    assert G.load_glyphs(p).num_classes == 3


# ----------------------------------------------------------------- split / dataset
def test_split_classes_deterministic_and_disjoint():
    tr, he = G.split_classes(100, 30, seed=0)
    assert len(tr) == 70 and len(he) == 30
    assert set(tr).isdisjoint(he) and set(tr) | set(he) == set(range(100))
    tr2, he2 = G.split_classes(100, 30, seed=0)
    np.testing.assert_array_equal(he, he2)
    _, he3 = G.split_classes(100, 30, seed=1)
    assert set(he3) != set(he)
    with pytest.raises(ValueError):
        G.split_classes(10, 10)


def test_split_glyphs_relabels_consistently(tiny_cache):
    gs = G.load_glyphs(tiny_cache)
    original = {i: gs.chars[c] for i, c in enumerate(gs.labels)}  # image -> char
    train, held = G.split_glyphs(gs, heldout_classes=10, seed=3)
    assert train.num_classes == len(LATIN) - 10 and held.num_classes == 10
    assert set(train.chars).isdisjoint(held.chars)
    for part in (train, held):
        assert sorted(set(part.labels.tolist())) == list(range(part.num_classes))
        # each image still carries the character it was rendered from
        for img, lab in zip(part.images[:40], part.labels[:40]):
            matches = [i for i, im in enumerate(gs.images) if np.array_equal(im, img)]
            assert part.chars[lab] in {original[i] for i in matches}


def test_glyph_dataset_items(tmp_path):
    p = tmp_path / "syn.npz"
    write_synthetic_cache(p)
    gs = G.load_glyphs(p)
    gs.images[0] = 0
    gs.images[0, 1, 2] = 255
    gs.images[0, 3, 3] = 51
    ds = G.GlyphDataset(gs)
    x, y = ds[0]
    assert x.shape == (1, 4, 4) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.item() == 0
    assert x[0, 1, 2].item() == 1.0 and x[0, 0, 0].item() == -1.0
    assert x[0, 3, 3].item() == pytest.approx(51 / 127.5 - 1)
    seen = []
    ds_t = G.GlyphDataset(gs, transform=lambda t: seen.append(t.shape) or -t)
    assert torch.equal(ds_t[0][0], -x) and seen == [(1, 4, 4)]
    assert len(ds) == 6 and ds.num_classes == 3


# ----------------------------------------------------------------- the real cache
REAL = P.default_cache_dir() / "glyphs_jis1_32.npz"


@pytest.mark.skipif(not REAL.exists(), reason="real glyph cache not prepared on this machine")
def test_real_glyph_cache():
    gs = G.load_glyphs(REAL, min_designs=4)
    level1 = P.jis_kanji("jis1")
    assert gs.images.dtype == np.uint8 and gs.images.shape[1:] == (32, 32)
    assert 2800 <= gs.num_classes <= 2965 and set(gs.chars) <= set(level1)
    assert len(gs.faces) >= 20
    pairs = gs.labels * len(gs.faces) + gs.designs
    assert len(np.unique(pairs)) == len(pairs)  # one image per (kanji, design)
    assert np.bincount(gs.labels).min() >= 4
    means = gs.images.reshape(len(gs), -1).mean(1)
    assert means.min() > 0 and means.max() < 255  # no blank or solid renders
    train, held = G.split_glyphs(gs, heldout_classes=300, seed=0)
    assert held.num_classes == 300 and train.num_classes == gs.num_classes - 300

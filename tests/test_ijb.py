"""IJB-B / IJB-C 1:1 verification (``python -m launch.evaluate --ijb``) on a small synthetic set
written in the released layout, against oracles written here from the protocol's definition:

* alignment: the similarity transform that placed each synthetic face in its loose crop is known,
  so the estimated alignment must be its inverse, and the aligned crop the original face;
* pooling: a plain loop over templates and medias on given features;
* TAR@FAR: brute-force thresholding at every distinct score;
* end to end: the same model's features computed here (own alignment by linear least squares,
  own normalisation) through the two loops above give the JSON's numbers;
* the batch size, an interrupted run resumed from the cache, two ranks and an ONNX export of the
  model all give the same numbers; bad input is one line naming the file and line.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from launch.align import align_face, estimate_similarity, template
from launch.ijb import (FARS, Setting, TorchEmbedder, evaluate_ijb, image_features, pool_templates,
                        read_chunk, tar_at_far)
from launch.metrics import far_key
from tests.dist_utils import run_distributed

# The two-rank test's spawned processes import this module: the heavier imports (the checkpoint
# code pulls in partialfc and torch._dynamo, ~2x the import time) wait in the functions below.


def load_backbone(ckpt: Path) -> torch.nn.Module:
    from launch.checkpoint import load_backbone as load

    return load(ckpt)[0]


def evaluate_main(argv: list) -> int:
    from launch.evaluate import main

    return main(argv)

#: the field's 112 x 112 five-point template (left eye, right eye, nose, mouth left, mouth right),
#: written here from the protocol's description, not imported from the code under test
FIELD_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
MODEL_SIZE = 32  # the tiny test model's input: the template scaled by 32 / 112
CHUNK = 8        # images per cache chunk in the resume / two-rank tests


# -- synthetic faces --------------------------------------------------------------------------

def draw_face(identity: int, variant: int, size: int = 112) -> np.ndarray:
    """A smooth synthetic "face" ``(size, size, 3)`` uint8 (BGR) in the aligned frame: coloured
    blobs fixed per identity, dark blobs at the template's landmarks, a per-image brightness and
    blob jitter (``variant``)."""
    rng_id, rng_var = np.random.default_rng(1000 + identity), np.random.default_rng(variant)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.ones((size, size, 3)) * rng_id.uniform(60, 190, 3)
    for _ in range(6):
        cx, cy = rng_id.uniform(0, size, 2) + rng_var.normal(0, 2, 2)
        sigma = rng_id.uniform(8, 20)
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))[..., None] * rng_id.uniform(-80, 80, 3)
    for x, y in FIELD_TEMPLATE * (size / 112):
        img -= 70 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.5 ** 2))[..., None]
    img += rng_var.normal(0, 8)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_similarity(rng: np.random.Generator, canvas: tuple[int, int], scale=(1.1, 1.7)) -> np.ndarray:
    """A random ``(2, 3)`` similarity (rotation +-30 deg, scale, shift) mapping the 112 x 112
    aligned frame into a ``canvas`` = (width, height) loose crop, the frame's centre near the crop's."""
    angle, s = rng.uniform(-np.pi / 6, np.pi / 6), rng.uniform(*scale)
    rot = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array(canvas) / 2 + rng.uniform(-8, 8, 2) - rot @ np.array([55.5, 55.5])
    return np.hstack([rot, shift[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent oracle: the least-squares similarity ``[[a, -b, tx], [b, a, ty]]`` by a linear
    solve (the same optimum as Umeyama's: every (a, b) is a rotation times a scale)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.astype(np.float64), dst.astype(np.float64)):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


# -- the synthetic IJB layout -----------------------------------------------------------------

def write_layout(root: Path, seed: int = 0) -> None:
    """``root/meta/ijbc_*.txt`` + ``root/loose_crop/*.jpg``: 6 identities x 3 templates, each of
    1-3 medias of 1-2 images (one image also in a second template, one listed image unused), all
    template pairs (18 genuine, 135 impostor). Template and media ids are sparse; a media id is
    shared between two templates."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, lmk_lines, templates = [], [], []
    image_no, media_no = 0, 500
    for identity, k in itertools.product(range(6), range(3)):
        tid = 10 + 7 * (3 * identity + k)
        templates.append((tid, identity))
        for _ in range(rng.integers(1, 4)):
            media_no += 3
            for _ in range(rng.integers(1, 3)):
                image_no += 1
                name = f"{image_no}.jpg"
                canvas = (int(rng.integers(150, 190)), int(rng.integers(150, 190)))
                t = random_similarity(rng, canvas, scale=(0.9, 1.3))
                loose = cv2.warpAffine(draw_face(identity, image_no), t, canvas, flags=cv2.INTER_LINEAR,
                                       borderValue=(90, 90, 90))
                cv2.imwrite(str(root / "loose_crop" / name), loose, [cv2.IMWRITE_JPEG_QUALITY, 95])
                pts = apply(t, FIELD_TEMPLATE.astype(np.float64))
                lmk_lines.append(" ".join([name, *(f"{v:.4f}" for v in pts.ravel()),
                                           f"{rng.uniform(0.1, 1.0):.3f}"]))
                faces.append(f"{name} {tid} {media_no}")
    faces.append(f"1.jpg {templates[5][0]} 503")  # image 1 again, in another template, media shared
    lmk_lines.insert(3, lmk_lines[0].replace("1.jpg", "unused.jpg", 1))
    shutil.copy(root / "loose_crop" / "1.jpg", root / "loose_crop" / "unused.jpg")
    pairs = [f"{a} {b} {int(ia == ib)}" for (a, ia), (b, ib) in itertools.combinations(templates, 2)]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


# -- oracles ----------------------------------------------------------------------------------

def oracle_pool(raw: np.ndarray, det: np.ndarray, face_image, face_template, face_media, setting) -> dict:
    """``{template id: L2-normalised feature}`` by the protocol's definition, one template at a time
    (in float64, as the code under test; the field's scripts add and weigh in float32)."""
    raw, out = np.asarray(raw, np.float64), {}
    for tid in sorted(set(face_template)):
        medias: dict = {}
        for img, t, m in zip(face_image, face_template, face_media):
            if t != tid:
                continue
            f = raw[img, 0] + raw[img, 1] if setting.flip else raw[img, 0]
            if not setting.norm:
                f = f / np.linalg.norm(f)
            if setting.detector:
                f = f * float(det[img])
            medias.setdefault(m, []).append(f)
        total = sum(np.mean(fs, axis=0) for fs in medias.values())
        out[tid] = total / np.linalg.norm(total)
    return out


def oracle_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Highest TAR over the thresholds (accept score >= t, every distinct score and +inf) whose
    impostor accept rate is <= far; NaN when fewer than 1 / far impostors."""
    pos, neg = scores[labels], scores[~labels]
    if len(neg) * far < 1:
        return float("nan")
    best = 0.0
    for t in np.unique(scores):
        if np.mean(neg >= t) <= far:
            best = max(best, float(np.mean(pos >= t)))
    return best


def read_meta(root: Path):
    """The layout's files, read here: image -> (landmarks float32, score), faces, pairs."""
    lmk = {}
    for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().split("\n"):
        if line:
            f = line.split()
            lmk[f[0]] = (np.array(f[1:11], dtype=np.float32).reshape(5, 2), np.float32(f[11]))
    faces = [line.split() for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().split("\n") if line]
    pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    return lmk, faces, pairs


def oracle_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(genuine score > impostor score) + P(equal) / 2 over all genuine x impostor pairs."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def oracle_result(root: Path, ckpt: Path) -> tuple[dict, np.ndarray, dict]:
    """``({far key: TAR, "auc": AUC}, pair scores (P,), {image name: (2, d) raw embeddings})`` computed here: cv2.imread, alignment
    by the linear least-squares similarity onto the scaled template, RGB, (x / 255 - 0.5) / 0.5,
    the backbone on image and mirror, :func:`oracle_pool`, cosines, :func:`oracle_tar`."""
    lmk, faces, pairs = read_meta(root)
    backbone = load_backbone(ckpt)
    names = sorted({f[0] for f in faces})
    crops = []
    for name in names:
        m = lstsq_similarity(lmk[name][0], FIELD_TEMPLATE.astype(np.float64) * (MODEL_SIZE / 112))
        bgr = cv2.imread(str(root / "loose_crop" / name))
        crops.append(cv2.warpAffine(bgr, m, (MODEL_SIZE, MODEL_SIZE), borderValue=0.0)[:, :, ::-1])
    x = torch.from_numpy(np.stack(crops).astype(np.float32)).permute(0, 3, 1, 2) / 255.0
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        raw = torch.stack([backbone(x), backbone(torch.flip(x, dims=[3]))], dim=1).numpy()  # (N, 2, d)
    index = {n: i for i, n in enumerate(names)}
    det = np.array([lmk[n][1] for n in names])
    feats = oracle_pool(raw, det, [index[f[0]] for f in faces], [int(f[1]) for f in faces],
                        [int(f[2]) for f in faces], Setting())
    scores = np.array([float(feats[a] @ feats[b]) for a, b, _ in pairs])
    labels = pairs[:, 2] == 1
    want = {far_key(far): oracle_tar(scores, labels, far) for far in FARS}
    want["auc"] = oracle_auc(scores, labels)
    return want, scores, {n: raw[index[n]] for n in names}


def metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith("tar@") or k == "auc"}


def as_nan(value):
    return float("nan") if value is None else value


def cached_features(result: dict, chunk: int) -> np.ndarray:
    """The cache's raw embeddings ``(N, 2, d)`` of a run, in image order."""
    n = result["images"]
    folder = Path(result["cache"]["folder"])
    return np.concatenate([read_chunk(folder / f"feat_{s:08d}_{min(s + chunk, n):08d}.npy", min(s + chunk, n) - s)
                           for s in range(0, n, chunk)])


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on 2 threads of a busy machine wait on each other (batch 1: 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("IJBC")
    write_layout(root)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tests.test_evaluate_cli import make_checkpoint

    folder = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    return make_checkpoint(folder, in_channels=3, overrides=["--data.image_size", str(MODEL_SIZE)])


def run(layout: Path, ckpt: Path, out: Path, **kwargs) -> dict:
    return evaluate_ijb(layout, "IJBC", TorchEmbedder(load_backbone(ckpt)), out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def baseline(layout, checkpoint, tmp_path_factory) -> dict:
    """One plain run: batch 256 (more than the images), one chunk."""
    return run(layout, checkpoint, tmp_path_factory.mktemp("baseline"), batch_size=256)


# -- alignment ---------------------------------------------------------------------------------

def test_alignment_inverts_the_known_similarity_and_recovers_the_face():
    """Faces placed in loose crops by known similarities (rotation, scale, shift): the estimated
    alignment is the inverse transform, its crop is the face up to interpolation, the template is the
    field's (scaled for other input sizes), and noisy or mirrored landmarks get the least-squares
    proper similarity."""
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(template(112), FIELD_TEMPLATE, rtol=0, atol=0)
    np.testing.assert_allclose(template(56), FIELD_TEMPLATE.astype(np.float64) / 2, rtol=1e-15)
    for k in range(4):
        face = draw_face(k, k)
        canvas = (300, 280)
        t = random_similarity(rng, canvas)
        loose = cv2.warpAffine(face, t, canvas, flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        landmarks = apply(t, FIELD_TEMPLATE.astype(np.float64))
        m = estimate_similarity(landmarks, template(112))
        t_inv = np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2]
        np.testing.assert_allclose(m, t_inv, atol=1e-9)
        aligned = align_face(loose, landmarks).astype(np.float64)
        diff = np.abs(aligned - face)[2:-2, 2:-2]  # the frame's edge was blended with the crop's background
        assert diff.mean() < 1.0 and np.percentile(diff, 99) < 4.0, (diff.mean(), np.percentile(diff, 99))

        noisy = landmarks + rng.normal(0, 2.0, landmarks.shape)
        np.testing.assert_allclose(estimate_similarity(noisy, template(112)),
                                   lstsq_similarity(noisy, template(112)), atol=1e-9)
        mirrored = noisy * [-1, 1]
        np.testing.assert_allclose(estimate_similarity(mirrored, template(112)),
                                   lstsq_similarity(mirrored, template(112)), atol=1e-9)


def test_grey_models_get_the_grey_conversion_of_training(layout):
    """A model trained on grey images (in_channels 1) gets the aligned crop converted as in training
    (Pillow's "L": ITU-R 601 luma of the RGB crop), normalised to [-1, 1]."""
    from launch.ijb import AlignedFaces, load_protocol

    protocol = load_protocol(layout, "IJBC", with_pairs=False)
    _, rgb, _ = AlignedFaces(protocol, [3], 48, 3)[0]  # (3, 48, 48)
    index, grey, error = AlignedFaces(protocol, [3], 48, 1)[0]  # (1, 48, 48)
    assert (index, error, grey.shape) == (3, "", (1, 48, 48))
    r, g, b = (rgb.numpy() + 1) * 127.5
    np.testing.assert_allclose((grey[0].numpy() + 1) * 127.5, 0.299 * r + 0.587 * g + 0.114 * b, atol=1.0)


# -- pooling and TAR@FAR ------------------------------------------------------------------------

@pytest.mark.parametrize("norm,detector,flip", list(itertools.product([True, False], repeat=3)))
def test_pooling_matches_the_definition(norm, detector, flip):
    """Mean per media within a template, sum over medias, L2 norm; N/D/F switches on the image feature."""
    rng = np.random.default_rng(2)
    n_img, n_face, d = 30, 45, 6
    raw = rng.normal(size=(n_img, 2, d)).astype(np.float32)
    det = rng.uniform(0.1, 1.0, n_img).astype(np.float32)
    face_image = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_face - n_img)])
    face_template = rng.choice([3, 17, 18, 40, 1000, 7], n_face)
    face_media = rng.choice([1, 2, 5, 9, 11], n_face)  # media ids shared between templates
    setting = Setting(norm=norm, detector=detector, flip=flip)
    ids, feats = pool_templates(image_features(raw, det, setting)[face_image], face_template, face_media)
    want = oracle_pool(raw, det, face_image, face_template, face_media, setting)
    assert list(ids) == sorted(want)
    np.testing.assert_allclose(feats, np.stack([want[t] for t in ids]), rtol=1e-12, atol=1e-12)
    assert setting.name == f"N{int(norm)}D{int(detector)}F{int(flip)}"


def test_tar_at_far_matches_brute_force_and_reports_unresolvable_fars_as_nan():
    """Ties included; a FAR below 1 / impostors is NaN, never extrapolated."""
    rng = np.random.default_rng(3)
    labels = np.zeros(1560, bool)
    labels[:60] = True
    scores = np.round(rng.normal(size=1560) + 2.0 * labels, 2)  # many ties
    got = tar_at_far(scores, labels)
    for far in FARS:
        want = oracle_tar(scores, labels, far)
        np.testing.assert_equal(got[far_key(far)], want)
    assert np.isnan(got["tar@far=1e-4"]) and not np.isnan(got["tar@far=1e-3"])
    assert any("1e-4" in note for note in got["notes"])


# -- end to end --------------------------------------------------------------------------------

def test_cli_writes_the_oracle_metrics_json_and_roc(layout, checkpoint, tmp_path):
    """``python -m launch.evaluate --ijb ROOT --target IJBC --checkpoint DIR``: table, JSON and PNG;
    the numbers are the oracle's, from the same model's features computed in this test."""
    out = tmp_path / "results"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = evaluate_main(["--ijb", str(layout), "--target", "ijbc", "--checkpoint", str(checkpoint),
                            "--output", str(out), "--batch-size", "7", "--workers", "0"])
    assert rc == 0, stderr.getvalue()
    result = json.loads((out / "ijb_IJBC.json").read_text())
    png = out / "ijb_IJBC_roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    want, scores, raw = oracle_result(layout, checkpoint)
    np.testing.assert_allclose(np.load(out / "ijb_IJBC_scores.npy"), scores, rtol=0, atol=1e-6)
    for key, value in want.items():
        np.testing.assert_allclose(as_nan(result[key]), value, rtol=1e-12, err_msg=key)
    assert result["tar@far=1e-1"] is not None and result["tar@far=1e-3"] is None
    assert 0.0 < result["tar@far=1e-1"] < 1.0  # not a degenerate model: a wrong step moves it
    assert (result["images"], result["templates"], result["pairs"], result["genuine"]) == (len(raw), 18, 153, 18)
    lines = stdout.getvalue().splitlines()
    assert lines[0].startswith("IJBC 1:1 verification, N1D1F1") and "1e-06" in lines[1] and "n/a" in lines[2]
    assert f"{100 * result['tar@far=1e-1']:.2f}" in lines[2]
    features = cached_features(result, 4096)
    np.testing.assert_allclose(features, np.stack([raw[n] for n in sorted(raw, key=lambda s: int(s.split('.')[0]))]),
                               rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_metrics(layout, checkpoint, baseline, tmp_path):
    """Regression for insightface issue #1351 (IJB-C TAR@FAR=1e-5 52.6 at batch 32 vs 57.9 at 1024):
    batch 1 and batch 256 give identical metrics and features within 1e-5."""
    one = run(layout, checkpoint, tmp_path, batch_size=1)
    assert metrics(one) == metrics(baseline)
    np.testing.assert_allclose(cached_features(one, 4096), cached_features(baseline, 4096),
                               rtol=1e-5, atol=1e-6)


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_the_cache(layout, checkpoint, baseline, tmp_path):
    """Stopped after 3 of 8 chunks: the rerun embeds only the other 5 and gives the same metrics."""
    done = []

    def stop_after_three(chunk):
        done.append(chunk)
        if len(done) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(layout, checkpoint, tmp_path, batch_size=5, chunk_images=CHUNK, on_chunk=stop_after_three)
    assert not (tmp_path / "ijb_IJBC.json").exists()
    again = []
    resumed = run(layout, checkpoint, tmp_path, batch_size=5, chunk_images=CHUNK, on_chunk=again.append)
    assert resumed["cache"]["chunks"] == 8 == -(-resumed["images"] // CHUNK)
    assert resumed["cache"]["reused"] == 3 and resumed["cache"]["computed"] == 5
    assert not set(again) & set(done) and len(again) == 5
    assert metrics(resumed) == metrics(baseline)
    np.testing.assert_allclose(cached_features(resumed, CHUNK), cached_features(baseline, 4096),
                               rtol=1e-5, atol=1e-6)


def _rank_eval(rank: int, world: int, layout: Path, embedder: TorchEmbedder, out: Path):
    return evaluate_ijb(layout, "IJBC", embedder, out, batch_size=4, chunk_images=CHUNK, progress=False)


def test_two_ranks_share_the_images_and_give_the_metrics_of_one(layout, checkpoint, baseline, tmp_path):
    """Each rank embeds every other chunk into the shared cache; rank 0 pools them."""
    embedder = TorchEmbedder(load_backbone(checkpoint))
    results = run_distributed(_rank_eval, 2, layout, embedder, tmp_path, timeout=120)
    assert results[1] is None
    result = results[0]
    assert result["cache"]["world_size"] == 2 and result["cache"]["computed_per_rank"] == [4, 4]
    assert metrics(result) == metrics(baseline)


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_export_gives_the_metrics_of_its_checkpoint(layout, checkpoint, baseline, tmp_path, dynamic):
    """``--onnx`` with a model exported by ``launch.export``; a static batch runs in padded sub-batches."""
    from launch.export import export_onnx

    backbone = load_backbone(checkpoint)
    path = tmp_path / "model.onnx"
    export_onnx(backbone, path, (3, MODEL_SIZE, MODEL_SIZE) if dynamic else (4, 3, MODEL_SIZE, MODEL_SIZE),
                dynamic_batch=dynamic, exporter="torchscript")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = evaluate_main(["--ijb", str(layout), "--onnx", str(path), "--batch-size", "5", "--workers", "0"])
    assert rc == 0
    result = json.loads((tmp_path / "model_ijb" / "ijb_IJBC.json").read_text())
    assert metrics(result) == metrics(baseline)
    np.testing.assert_allclose(cached_features(result, 4096), cached_features(baseline, 4096),
                               rtol=1e-4, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------

def _break_missing_meta(root: Path):
    (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    return ["ijbc_template_pair_label.txt", "missing IJB meta file"]


def _break_missing_image(root: Path):
    (root / "loose_crop" / "5.jpg").unlink()
    return ["loose_crop/5.jpg does not exist", "ijbc_name_5pts_score.txt:6", "1 of"]


def _break_template_without_images(root: Path):
    with open(root / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("10 99999 0\n")
    return ["ijbc_template_pair_label.txt: row 154", "template 99999 has no images"]


def _break_landmark_line(root: Path):
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().split("\n")
    lines[6] = lines[6].rsplit(" ", 2)[0]  # two fields short
    path.write_text("\n".join(lines))
    return ["ijbc_name_5pts_score.txt:7", "12 fields"]


def _break_landmark_value(root: Path):
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().split("\n")
    fields = lines[2].split()
    lines[2] = " ".join([fields[0], "nan", *fields[2:]])
    path.write_text("\n".join(lines))
    return ["ijbc_name_5pts_score.txt:3", "not finite"]


def _break_face_line(root: Path):
    path = root / "meta" / "ijbc_face_tid_mid.txt"
    path.write_text(path.read_text().replace("\n", "\n2.jpg x 3\n", 1))
    return ["ijbc_face_tid_mid.txt:2", "TEMPLATE_ID MEDIA_ID"]


def _break_image_file(root: Path):
    (root / "loose_crop" / "4.jpg").write_bytes(b"not a jpeg")
    return ["cannot decode image", "4.jpg"]


@pytest.mark.parametrize("breaker", [_break_missing_meta, _break_missing_image, _break_template_without_images,
                                     _break_landmark_line, _break_landmark_value, _break_face_line,
                                     _break_image_file], ids=lambda f: f.__name__[7:])
def test_bad_input_is_one_line_naming_the_file(layout, checkpoint, tmp_path, breaker):
    root = tmp_path / "IJBC"
    shutil.copytree(layout, root)
    expected = breaker(root)
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        rc = evaluate_main(["--ijb", str(root), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"),
                            "--workers", "0", "--no-progress"])
    err = stderr.getvalue()
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err

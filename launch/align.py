"""Face alignment by 5 landmarks: the similarity transform to the ArcFace template, then a warp.

The field's IJB-B / IJB-C scripts (insightface ``recognition/_evaluation_/ijb``, arcface_torch
``eval_ijbc.py``) estimate a similarity transform (rotation, uniform scale, translation; no
reflection) from the 5 detected landmarks to a fixed 5-point template by least squares
(Umeyama 1991, scikit-image's ``SimilarityTransform.estimate``) and warp the loose crop with
``cv2.warpAffine(image, M, (112, 112), borderValue=0.0)``: bilinear, black outside the crop.
Reported numbers move by points when any of this differs, so this module reproduces it:

* the template below, as float32 like theirs (left eye, right eye, nose tip, left and right
  mouth corners, in pixels of the 112 x 112 crop; x to the right, y down, pixel centres at
  integer coordinates, OpenCV's convention);
* the Umeyama least-squares similarity, in float64, written out here (a dozen lines of numpy);
* the warp by OpenCV itself. Why OpenCV and not Pillow or ``grid_sample``: OpenCV's bilinear
  ``warpAffine`` on uint8 images is fixed point (coordinates rounded to 1/32 pixel, 15-bit
  weights) and pads with the border value, while Pillow interpolates in floating point and
  replicates edge pixels; both differ from the field's crops by up to a few grey levels. Only
  the same library gives the same pixels.

A model trained at another input size ``S`` gets the template scaled by ``S / 112``.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "estimate_similarity", "template"]

#: (5, 2) landmark positions of the field's 112 x 112 aligned crop (float32, as theirs).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963],
                                 [73.5318, 51.5014],
                                 [56.0252, 71.7366],
                                 [41.5493, 92.3655],
                                 [70.7299, 92.2041]], dtype=np.float32)


def template(size: int = 112) -> np.ndarray:
    """The ArcFace template for a ``size`` x ``size`` crop: ``(5, 2)`` float64 pixels."""
    return ARCFACE_TEMPLATE_112.astype(np.float64) * (size / 112.0)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``dst ≈ s R src + t`` (Umeyama), as a ``(2, 3)`` float64 matrix.

    ``src``, ``dst``: ``(n, 2)`` corresponding points, n >= 2. ``R`` is a proper rotation
    (a reflection is never chosen). Raises ``ValueError`` when ``src`` has no spread.
    """
    src = np.asarray(src, dtype=np.float64)  # (n, 2)
    dst = np.asarray(dst, dtype=np.float64)  # (n, 2)
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)  # (2,)
    xs, xd = src - mu_src, dst - mu_dst  # (n, 2)
    var_src = (xs ** 2).sum() / len(src)  # mean squared distance to the centroid
    if not np.isfinite(var_src) or var_src <= 1e-12:
        raise ValueError("landmarks have no spread: a similarity transform is undefined")
    cov = xd.T @ xs / len(src)  # (2, 2)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])  # no reflection
    rotation = u @ np.diag(d) @ vt  # (2, 2)
    scale = float((sigma * d).sum() / var_src)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_dst - scale * rotation @ mu_src
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` aligned crop of ``image`` ``(H, W[, C])`` uint8, whose 5
    ``landmarks`` ``(5, 2)`` (x, y pixels) go to :func:`template` (``size``).

    Bilinear, black outside the image (``cv2.warpAffine`` with ``borderValue=0``, the field's call).
    Returns ``(size, size[, C])`` of the image's dtype, channels in the image's order.
    """
    matrix = estimate_similarity(landmarks, template(size))  # (2, 3): crop coords -> aligned coords
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)

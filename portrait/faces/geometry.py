"""Pixel geometry of the face toolkit: the detection copy, padding, the subject, 68-to-5 points,
aligned crops, sharpness.

Detection runs on a copy whose longer side is brought into ``[min_side, max_side]``: a face
that clears 10% of the image is large, so big photos lose nothing by shrinking, and small ones
(150 px LFW frames, 112 px aligned crops) are enlarged enough for a detector's smallest window.
Tight aligned crops have no margin around the face, which defeats sliding-window detectors; when
the copy gives no face, the detector runs once more on the copy with a replicated border, and
(for detectors with a fixed smallest window, like dlib's 80 px HOG window) once more on the copy
enlarged twice, so that a photo of small faces is dropped for their size, not as "no face".
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

# What a detector returns on one array: boxes (n, 4) x0,y0,x1,y1, scores (n,), points (n, k, 2) or None.
Detections = tuple[np.ndarray, np.ndarray, np.ndarray | None]

# ArcFace's five reference points (eyes, nose tip, mouth corners) in a 112x112 crop.
ARCFACE_POINTS_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def detection_scale(height: int, width: int, min_side: int, max_side: int) -> float:
    """Factor that brings the longer side into [min_side, max_side] (1.0 when it already is)."""
    longer = max(height, width)
    if longer > max_side:
        return max_side / longer
    if longer < min_side:
        return min_side / longer
    return 1.0


def resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interpolation)


def detect_on_copy(
    rgb: np.ndarray,
    run: Callable[[np.ndarray], Detections],
    min_side: int,
    max_side: int,
    pad: float,
    upsample_on_miss: bool = False,
) -> Detections:
    """Run ``run`` on the detection copy, retrying as the module docstring says when it finds
    nothing; boxes and points come back in the original image's pixels."""
    return detect_on_copies([rgb], lambda copies: [run(c) for c in copies], min_side, max_side, pad, upsample_on_miss)[0]


def detect_on_copies(
    images: list[np.ndarray],
    run_many: Callable[[list[np.ndarray]], list[Detections]],
    min_side: int,
    max_side: int,
    pad: float,
    upsample_on_miss: bool = False,
) -> list[Detections]:
    """``detect_on_copy`` over many images with one call of ``run_many`` per try (a batched
    detector runs each try as one batch); each image's result is what ``detect_on_copy`` gives."""
    scales = [detection_scale(img.shape[0], img.shape[1], min_side, max_side) for img in images]
    copies = [np.ascontiguousarray(resize(img, scale)) for img, scale in zip(images, scales)]
    found = list(run_many(copies))
    offsets = [0] * len(images)
    misses = [i for i, (boxes, _, _) in enumerate(found) if len(boxes) == 0]
    if misses and pad > 0:
        borders = {i: max(1, round(pad * max(copies[i].shape[:2]))) for i in misses}
        padded = [cv2.copyMakeBorder(copies[i], *[borders[i]] * 4, cv2.BORDER_REPLICATE) for i in misses]
        for i, result in zip(misses, run_many(padded)):
            found[i] = result
            offsets[i] = borders[i] if len(result[0]) else 0
        misses = [i for i in misses if len(found[i][0]) == 0]
    if misses and upsample_on_miss:
        for i, result in zip(misses, run_many([np.ascontiguousarray(resize(copies[i], 2.0)) for i in misses])):
            found[i] = result
            scales[i] *= 2.0
    return [_to_original(result, offset, scale) for result, offset, scale in zip(found, offsets, scales)]


def _to_original(found: Detections, offset: int, scale: float) -> Detections:
    boxes, scores, points = found
    boxes = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - offset) / scale
    if points is not None:
        points = (np.asarray(points, dtype=np.float64) - offset) / scale
    return boxes, np.asarray(scores, dtype=np.float64).reshape(-1), points


def subject_first(faces: list, height: int, width: int, backend: str | None = None, settings=None) -> list:
    """The faces with the subject first, as the detect stage chooses it (portrait/faces/subject.py:
    by score and size, detections under the score floor never first unless alone; ``settings``:
    the build's ``subject.SubjectSettings``, by default the backend's thresholds); without a
    backend name, by box area inside the image alone. Inference and validation take the same
    face as the build."""
    from portrait.faces import subject  # subject.py builds on this module

    return subject.ranked(faces, height, width, backend, settings or subject.SubjectSettings())


def five_from_68(points68: np.ndarray) -> np.ndarray:
    """Eye centres (image-left eye first), nose tip, mouth corners: RetinaFace's five points."""
    p = np.asarray(points68, dtype=np.float64)
    return np.stack([p[36:42].mean(axis=0), p[42:48].mean(axis=0), p[30], p[48], p[54]])


def clipped_area(box, height: int, width: int) -> float:
    """Area of the part of ``box`` inside the image."""
    x0, y0, x1, y1 = box
    w = min(x1, width) - max(x0, 0.0)
    h = min(y1, height) - max(y0, 0.0)
    return max(0.0, w) * max(0.0, h)


def similarity_crop(rgb: np.ndarray, landmarks5: np.ndarray, size: int, padding: float) -> np.ndarray:
    """Aligned crop: a similarity transform that puts the five points on ArcFace's template,
    with ``padding`` (fraction of the template's side) added on every side, as dlib's chips do."""
    template = (ARCFACE_POINTS_112 / 112.0 + padding) / (1.0 + 2.0 * padding) * size
    matrix = similarity_matrix(np.asarray(landmarks5, dtype=np.float64), template)
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, shift) taking src points to dst
    (Umeyama's closed form, no reflection)."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var < 1e-12:
        raise ValueError("cannot align the face: its five landmarks coincide")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def aligned_sharpness(rgb: np.ndarray, landmarks5, size: int = 112) -> float:
    """Variance of the Laplacian over the inner face (the central 60%: eyes, nose, mouth) of the
    aligned face (ArcFace's template, no margin) at ``size`` x ``size`` grey pixels.

    Only the face itself is measured: a large blurred face cannot borrow the sharpness of a
    small sharp picture pasted inside its box (nor of hair or a collar at the crop's corners),
    and every photo, whatever its resolution, is judged at the same scale."""
    crop = similarity_crop(rgb, np.asarray(landmarks5, dtype=np.float64).reshape(5, 2), size, 0.0)
    laplacian = cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F)
    inner = slice(round(0.2 * size), round(0.8 * size))
    return float(laplacian[inner, inner].var())


def sharpness(rgb: np.ndarray, box, size: int = 128) -> float:
    """Variance of the Laplacian of the face box, resized to ``size`` x ``size`` grey pixels.

    A fixed size makes the figure comparable across image resolutions; a face enlarged from
    a few dozen pixels scores low, which is what a blur filter should see too.
    """
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0.0
    face = rgb[y0:y1, x0:x1]
    grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    interpolation = cv2.INTER_AREA if max(face.shape[:2]) > size else cv2.INTER_LINEAR
    grey = cv2.resize(grey, (size, size), interpolation=interpolation)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())

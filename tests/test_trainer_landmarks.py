"""Landmark geometry, rendering, 2D retargeting, and the face metrics on real photos (the build's face reader)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devtools.shards import template_landmarks
from portrait.faces.geometry import five_from_68, similarity_matrix
from portrait.landmarks import apply_transform, landmark_error, render_landmarks, retarget_landmarks, square_crop, to_crop


def rotation(degrees: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), shift[0]], [scale * np.sin(a), scale * np.cos(a), shift[1]]])


def test_square_crop_is_inside_and_centred_on_the_face():
    assert square_crop(400, 200, (300, 50, 360, 120)) == (200, 0, 200)  # clamped at the right edge
    assert square_crop(400, 200, (150, 50, 250, 150)) == (100, 0, 200)  # centred on the face
    assert square_crop(100, 300, (10, 200, 90, 290)) == (0, 195, 100)
    points = np.array([[200.0, 100.0]])
    np.testing.assert_allclose(to_crop(points, 100, 0, 200, 64), [[32.0, 32.0]])


def test_rendering_draws_on_the_landmarks_and_nowhere_far_from_them():
    points = template_landmarks() * 40 + 12
    image = np.asarray(render_landmarks(points, 64))
    lit = image.sum(axis=2) > 0
    for x, y in points.round().astype(int):
        assert lit[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any()
    assert not lit[:5].any() and not lit[:, :5].any()  # the face is inside [12, 52]
    five = np.asarray(render_landmarks(five_from_68(points), 64))
    for x, y in five_from_68(points).round().astype(int):
        assert five[y, x].sum() > 0
    with pytest.raises(ValueError, match="68x2 or 5x2"):
        render_landmarks(np.zeros((7, 2)), 64)


def test_similarity_transform_recovers_a_known_one():
    src = template_landmarks() * 100
    matrix = rotation(20, 1.7, (30, -5))
    found = similarity_matrix(src, apply_transform(matrix, src))
    np.testing.assert_allclose(found, matrix, atol=1e-6)


def _mouth_opening(points):
    return np.linalg.norm(points[[65, 66, 67]].mean(0) - points[[61, 62, 63]].mean(0))


def test_retargeting_takes_the_reference_face_shape_and_the_driving_pose_and_expression():
    template = template_landmarks().astype(np.float64)
    reference = template.copy()
    reference[:, 1] = 0.5 + (reference[:, 1] - 0.5) * 1.3  # a longer face
    driving_neutral = template.copy()
    driving_neutral[[65, 66, 67], 1] += 0.08  # an open mouth
    driving_neutral[[57, 58, 56], 1] += 0.08
    pose = rotation(15, 200, (50, 40))
    driving = apply_transform(pose, driving_neutral)
    refs = [apply_transform(rotation(-5, 150, (10, 0)), reference), apply_transform(rotation(3, 90, (0, 20)), reference)]
    out = retarget_landmarks(driving, refs)
    canonical = apply_transform(similarity_matrix(out[[27, 28, 29, 30, 36, 39, 42, 45]], (template * 200)[[27, 28, 29, 30, 36, 39, 42, 45]]), out)
    # pose: the eyes sit where the driving face's eyes are
    np.testing.assert_allclose(out[36:48].mean(0), driving[36:48].mean(0), atol=3)
    # face shape: jaw height relative to eye distance follows the (longer) reference, not the driving face
    def jaw_ratio(p):
        return (p[8, 1] - p[27, 1]) / (p[45, 0] - p[36, 0])
    ref_canon = reference * 200
    assert abs(jaw_ratio(canonical) - jaw_ratio(ref_canon)) < abs(jaw_ratio(canonical) - jaw_ratio(template * 200))
    # expression: the mouth stays open like the driving face's
    assert _mouth_opening(out) > 2 * _mouth_opening(apply_transform(pose, template))


def test_landmark_error_is_normalised_by_eye_distance():
    target = template_landmarks() * 100
    assert landmark_error(target, target) == 0
    inter_ocular = np.linalg.norm(five_from_68(target)[0] - five_from_68(target)[1])
    assert landmark_error(target + [3, 4], target) == pytest.approx(5 / inter_ocular)
    assert landmark_error(target, five_from_68(target)) == pytest.approx(0, abs=1e-6)


@pytest.fixture(scope="module")
def reader():
    from portrait.faces.reader import FaceReader

    return FaceReader()  # the default settings: dlib, as the demo build


def test_face_metrics_on_real_photos(faces_dir, reader):
    from trainer.metrics import face_metrics, summarise

    def photos(name, count):
        return [Image.open(p).convert("RGB") for p in sorted((faces_dir / "dev" / name).iterdir())[:count]]

    def read(photo):
        return reader.read(np.asarray(photo))

    blair = photos("Tony_Blair", 4)
    kidman = photos("Nicole_Kidman", 3)
    refs = [read(p).embedding for p in blair[1:]]
    target = read(blair[0])
    same = face_metrics(reader, blair[0], refs, target.landmarks)
    other = face_metrics(reader, kidman[0], refs, read(kidman[0]).landmarks)
    assert same["detected"] and other["detected"]
    assert same["similarity"] > 0.9 and same["similarity"] > other["similarity"] + 0.03
    assert same["landmark_error"] < 0.02
    shifted = face_metrics(reader, blair[0], refs, target.landmarks + 10)
    assert shifted["landmark_error"] > 0.1
    five = face_metrics(reader, blair[0], refs, target.landmarks5)  # a 5-point target: 68 reduced to 5
    assert five["landmark_error"] < 0.02
    blank = face_metrics(reader, Image.new("RGB", (64, 64), (128, 128, 128)), refs, target.landmarks)
    assert blank == {"detected": False, "similarity": None, "landmark_error": None}
    summary = summarise([same, other, blank], reader.embedding_model)
    assert summary["images"] == 3 and summary["faces_detected"] == 2 and summary["detector_misses"] == 1
    assert summary["face_similarity"] == pytest.approx((same["similarity"] + other["similarity"]) / 2)
    assert summary["similarity_model"] == "dlib_face_recognition_resnet_model_v1"

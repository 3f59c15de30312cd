"""The dlib backend on the real photos of ../shared/fixtures/faces: box convention, coordinates on
the detection copy mapped back, padding for tight crops, model files located without importing
face_recognition_models."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from portrait.decode import load_rgb
from portrait.faces import FaceSettings, load_backend, model_provenance
from portrait.faces.dlib_backend import from_retinaface, to_retinaface
from face_pipeline import DEV, REPO, dev_result, sources

needs_photos = pytest.mark.usefixtures("faces_dir")  # skips, saying why, when the fixtures are absent


@pytest.fixture(scope="module")
def backend():
    return load_backend(FaceSettings())


def _rgb(path) -> np.ndarray:
    return np.array(load_rgb(path.read_bytes()))


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _landmark_reference_box(points68: np.ndarray) -> tuple[float, float, float, float]:
    """A RetinaFace-convention box from the 68 points: cheek to cheek along the jaw line, chin at
    the bottom, top a brow-to-nose-base distance above the brows (the face's upper third)."""
    brow = points68[17:27, 1].min()
    top = brow - (points68[33, 1] - brow)
    return (points68[0:17, 0].min(), top, points68[0:17, 0].max(), points68[8, 1])


def test_model_files_are_found_without_importing_face_recognition_models():
    code = (
        "import sys\n"
        "from portrait.faces import load_backend\n"
        "b = load_backend({})\n"
        "assert 'face_recognition_models' not in sys.modules, 'imported'\n"
        "assert 'pkg_resources' not in sys.modules, 'pkg_resources imported'\n"
        "print(sorted(p.name for p in b.files.values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "shape_predictor_68_face_landmarks.dat" in out.stdout and "dlib_face_recognition_resnet_model_v1.dat" in out.stdout


def test_a_model_folder_without_the_files_is_a_clear_error(tmp_path):
    (tmp_path / "shape_predictor_5_face_landmarks.dat").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        load_backend(FaceSettings(model_dir=str(tmp_path)))
    msg = str(e.value)
    assert str(tmp_path) in msg and "shape_predictor_68_face_landmarks.dat" in msg
    assert "dlib_face_recognition_resnet_model_v1.dat" in msg and "face-recognition-models" in msg
    with pytest.raises(FileNotFoundError, match="mmod_human_face_detector.dat"):
        model_provenance(FaceSettings(model_dir=str(tmp_path), detector="cnn"))


def test_settings_refuse_unknown_keys_and_contradictions():
    with pytest.raises(ValueError, match="detect_max_sid"):
        FaceSettings.model_validate({"detect_max_sid": 640})
    with pytest.raises(ValueError, match="larger than detect_max_side"):
        FaceSettings(detect_min_side=800, detect_max_side=640)
    with pytest.raises(ValueError, match="dlib backend only"):
        FaceSettings(backend="insightface", model_dir="x", detector="cnn")
    with pytest.raises(ValueError, match="model_dir"):
        FaceSettings(backend="insightface")


def test_box_mapping_round_trips():
    box = (10.0, 20.0, 110.0, 140.0)
    mapped = to_retinaface(box)
    assert mapped[1] < box[1] and mapped[3] > box[3]  # taller, reaching up to the forehead
    assert np.allclose(from_retinaface(mapped), box)


@needs_photos
def test_mapped_boxes_match_a_landmark_built_retinaface_box_on_the_fixtures():
    """The mapping's factors were measured on these photos (see dlib_backend's docstring); this
    checks that they still hold: the mapped box overlaps the landmark reference far better than
    dlib's own tight box, and its area is the reference's within 20% on most photos."""
    table, _ = dev_result()
    mapped_iou, raw_iou, area_ratio = [], [], []
    for r in table.drop_columns(["image_bytes"]).to_pylist():
        if r["landmarks68"] is None:
            continue
        ref = _landmark_reference_box(np.array(r["landmarks68"]).reshape(68, 2))
        box = r["face_box"]
        mapped_iou.append(_iou(box, ref))
        raw_iou.append(_iou(from_retinaface(box), ref))
        area_ratio.append((box[2] - box[0]) * (box[3] - box[1]) / ((ref[2] - ref[0]) * (ref[3] - ref[1])))
    print(f"median IoU mapped {np.median(mapped_iou):.3f}, dlib box {np.median(raw_iou):.3f}; "
          f"area ratio median {np.median(area_ratio):.3f}")  # fmt: skip
    assert len(mapped_iou) >= 280
    assert np.median(mapped_iou) >= 0.75 and np.median(mapped_iou) > np.median(raw_iou) + 0.1
    assert 0.9 <= np.median(area_ratio) <= 1.1
    assert np.mean(np.abs(np.array(area_ratio) - 1) < 0.2) >= 0.75


@needs_photos
def test_coordinates_from_the_detection_copy_map_back_to_the_original(backend):
    rgb = _rgb(DEV / "Lionel_Messi" / "Lionel_Messi_0003.jpg")  # 1501x1876
    assert max(rgb.shape[:2]) > 1800
    at_640 = backend.detect(rgb)[0]
    at_320 = load_backend(FaceSettings(detect_max_side=320)).detect(rgb)[0]
    side = at_640.box[2] - at_640.box[0]
    # HOG boxes snap to its pyramid's levels, so their size moves with the copy's scale; the
    # landmarks, fitted on the original pixels, barely do
    assert _iou(at_640.box, at_320.box) > 0.6
    assert np.abs(at_640.landmarks5 - at_320.landmarks5).max() < 0.05 * side
    # the same photo at half size: every coordinate halves
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    at_half = backend.detect(half)[0]
    assert _iou(np.array(at_half.box) * 2, at_640.box) > 0.8
    assert np.abs(at_half.landmarks68 * 2 - at_640.landmarks68).mean() < 0.02 * side
    # and the landmarks sit on the face in the original: eyes inside the box, near its upper half
    x0, y0, x1, y1 = at_640.box
    assert x0 < at_640.landmarks5[0, 0] < at_640.landmarks5[1, 0] < x1
    assert y0 < at_640.landmarks5[:2, 1].mean() < (y0 + y1) / 2 + 0.1 * (y1 - y0)


@needs_photos
def test_padding_finds_faces_in_tight_aligned_crops():
    """112 px aligned crops have no margin around the face; with the copy at its native size, a
    replicated border lets the HOG detector find the faces it misses without one."""
    crops = [DEV / r["file"] for r in sources(DEV) if r["image_kind"] == "aligned_crop_112px"]
    images = [_rgb(p) for p in crops]
    native = dict(detect_min_side=112, detect_upsample_on_miss=False)
    without = load_backend(FaceSettings(detect_pad=0.0, **native))
    with_pad = load_backend(FaceSettings(detect_pad=0.25, **native))
    found_without = sum(bool(without.detect(im)) for im in images)
    found_with = sum(bool(with_pad.detect(im)) for im in images)
    assert found_with == len(crops) > found_without
    # boxes found on the padded copy come back in the crop's own coordinates
    for im in images:
        if not without.detect(im):
            face = with_pad.detect(im)[0]
            cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
            assert 0 < cx < im.shape[1] and 0 < cy < im.shape[0]
            assert face.landmarks5[:, 0].min() > -5 and face.landmarks5[:, 0].max() < im.shape[1] + 5


@needs_photos
def test_embedding_and_crop(backend):
    rgb = _rgb(DEV / "Colin_Powell" / "Colin_Powell_0001.jpg")
    face = backend.detect(rgb)[0]
    vec, crop = backend.embed(rgb, face, crop_size=200, crop_padding=0.4)
    assert vec.dtype == np.float32 and vec.shape == (128,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert crop.shape == (200, 200, 3) and crop.dtype == np.uint8
    # the crop is aligned: the eyes sit level and at mirrored positions
    aligned = backend.detect(np.ascontiguousarray(cv2.resize(crop, (400, 400))))[0]
    left, right = aligned.landmarks5[0], aligned.landmarks5[1]
    assert abs(left[1] - right[1]) < 0.05 * 400 and abs((left[0] + right[0]) / 2 - 200) < 0.05 * 400
    # the face box alone (no raw box) reproduces the same embedding: the embed stage's situation
    from portrait.faces.base import Face

    again, _ = backend.embed(rgb, Face(box=face.box, score=face.score, landmarks5=face.landmarks5))
    assert np.linalg.norm(again - vec) < 1e-3


@needs_photos
def test_cnn_detector_finds_the_face_and_maps_its_box():
    cnn = load_backend(FaceSettings(detector="cnn", detect_max_side=320))
    rgb = _rgb(DEV / "Colin_Powell" / "Colin_Powell_0001.jpg")
    hog_face = load_backend(FaceSettings()).detect(rgb)[0]
    faces = cnn.detect(rgb)
    assert len(faces) == 1 and faces[0].score > 0
    assert _iou(faces[0].box, hog_face.box) > 0.6
    assert "cnn" in cnn.box_convention

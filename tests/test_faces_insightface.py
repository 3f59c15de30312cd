"""The insightface backend, loaded by insightface's own ONNX loaders from a model pack folder.

No real weights exist here: tests/onnx_models.py exports small ONNX files in buffalo_l's and
antelopev2's layout (its detector is hand-set to "see" bright squares, its gender/age model
answers from brightness), and the real loading, detection, alignment, recognition and
gender/age code of insightface runs on them.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from portrait.faces import FaceSettings, load_backend, model_provenance
from portrait.faces.insightface_backend import PACKS
from onnx_models import write_pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return write_pack(tmp_path_factory.mktemp("models") / "buffalo_l")


@pytest.fixture(scope="module")
def backend(pack):
    return load_backend(FaceSettings(backend="insightface", model_dir=str(pack)))


def _square(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.full((height, width, 3), 10, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 250
    return img


def test_the_pack_loads_through_insightface_model_zoo(backend, pack):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.attribute import Attribute
    from insightface.model_zoo.landmark import Landmark
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(backend.detector, SCRFD) and backend.detector.use_kps
    assert isinstance(backend.recognizer, ArcFaceONNX) and backend.recognizer.input_size == (112, 112)
    assert isinstance(backend.genderage, Attribute) and backend.genderage.taskname == "genderage"
    assert isinstance(backend.landmarks68, Landmark)
    assert backend.detector.session.get_providers() == ["CPUExecutionProvider"]
    assert backend.embedding_model == "insightface:buffalo_l/w600k_r50.onnx" and backend.embedding_dim == 512
    info = model_provenance(FaceSettings(backend="insightface", model_dir=str(pack)))
    assert set(info["files"]) == {"detection", "recognition", "genderage", "landmark_3d_68"}


def test_detection_boxes_and_points_map_back_to_the_original_image(backend):
    square = (150, 100, 250, 200)  # a 100 px "face" in a 400x300 image
    small = _square(300, 400, square)
    big = _square(1500, 2000, tuple(v * 5 for v in square))  # same scene, 5x: shrunk to the 640 copy
    for img, k in ((small, 1), (big, 5)):
        faces = backend.detect(img)
        assert faces, k
        stride = 32 * max(img.shape[:2]) / 640  # the detector's cell, in this image's pixels
        for f in faces:
            x0, y0, x1, y1 = f.box
            assert square[0] * k - stride <= x0 and x1 <= square[2] * k + stride, (k, f.box)
            assert square[1] * k - stride <= y0 and y1 <= square[3] * k + stride, (k, f.box)
            assert f.landmarks5.shape == (5, 2) and f.landmarks68.shape == (68, 2)
            assert (x0 <= f.landmarks5[:, 0]).all() and (f.landmarks5[:, 0] <= x1).all()
            assert f.score > 0.5
        assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    assert backend.detect(np.full((300, 400, 3), 10, np.uint8)) == []


def test_the_detector_size_follows_detect_max_side(pack):
    narrow = load_backend(FaceSettings(backend="insightface", model_dir=str(pack), detect_max_side=320))
    assert narrow.detector_size() == 320
    assert narrow.detect(_square(300, 400, (100, 50, 300, 250)))  # 160 px on the 320 copy
    assert (320, 320) in narrow.detector.resolution_sessions


def test_embedding_and_crop(backend):
    img = _square(300, 400, (150, 100, 250, 200))
    face = backend.detect(img)[0]
    vec, crop = backend.embed(img, face, crop_size=128, crop_padding=0.25)
    assert vec.shape == (512,) and vec.dtype == np.float32 and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert crop.shape == (128, 128, 3)
    again, _ = backend.embed(img, face, crop_size=128)
    assert np.array_equal(vec, again)  # deterministic
    other, _ = backend.embed(_square(300, 400, (40, 40, 140, 140)) // 2 + 60, face)
    assert np.linalg.norm(vec - other) > 1e-3  # different pixels, different vector


def test_age_and_gender_come_from_the_genderage_model(backend):
    face = backend.detect(_square(300, 400, (150, 100, 250, 200)))[0]
    assert backend.has_age_gender_model
    bright = np.full((300, 400, 3), 250, np.uint8)
    dark = np.full((300, 400, 3), 5, np.uint8)
    # the test model says index 1 (insightface's "male") for bright crops, 0 for dark ones, age 0.30
    assert backend.age_gender(bright, face) == (30.0, "male")
    assert backend.age_gender(dark, face) == (30.0, "female")


def test_a_missing_folder_or_file_lists_what_is_expected_and_how_to_get_it(tmp_path, pack):
    with pytest.raises(FileNotFoundError) as e:
        load_backend(FaceSettings(backend="insightface", model_dir=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "does not exist" in msg and "det_10g.onnx" in msg and "w600k_r50.onnx" in msg and "genderage.onnx" in msg
    assert "buffalo_l.zip" in msg and "faces.model_dir" in msg
    partial = tmp_path / "antelopev2"
    partial.mkdir()
    (partial / "genderage.onnx").write_bytes((pack / "genderage.onnx").read_bytes())
    with pytest.raises(FileNotFoundError) as e:
        load_backend(FaceSettings(backend="insightface", model_dir=str(partial)))
    msg = str(e.value)
    assert "antelopev2" in msg and "lacks scrfd_10g_bnkps.onnx, glintr100.onnx" in msg and "antelopev2.zip" in msg


def test_a_file_of_the_wrong_kind_is_named(tmp_path, pack):
    wrong = tmp_path / "buffalo_l"
    wrong.mkdir()
    for role, name in PACKS["buffalo_l"].items():
        (wrong / name).write_bytes((pack / name).read_bytes())
    # the recognition model where the detector should be
    (wrong / "det_10g.onnx").write_bytes((pack / "w600k_r50.onnx").read_bytes())
    with pytest.raises(ValueError, match=r"det_10g.onnx: expected a SCRFD face detector model but insightface reads it as recognition"):
        load_backend(FaceSettings(backend="insightface", model_dir=str(wrong)))


def test_antelopev2_layout_without_the_optional_landmark_model(tmp_path):
    folder = write_pack(tmp_path / "antelopev2", pack="antelopev2", landmarks68=False)
    b = load_backend(FaceSettings(backend="insightface", model_dir=str(folder), threads=1))
    assert b.pack == "antelopev2" and b.embedding_model == "insightface:antelopev2/glintr100.onnx"
    face = b.detect(_square(300, 400, (150, 100, 250, 200)))[0]
    assert face.landmarks68 is None


def test_cuda_provider_is_requested_when_asked():
    s = FaceSettings(backend="insightface", model_dir="x", device="cuda", gpu_id=1)
    assert s.onnx_providers() == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert FaceSettings(backend="insightface", model_dir="x").onnx_providers() == ["CPUExecutionProvider"]


def test_the_stages_run_on_the_insightface_backend(pack):
    from face_pipeline import run_stages

    # on a 640 px image the copy is the image itself, and this square fills exactly one detector
    # window, so there is one face (its box, 96 px, is 2% of the image: the test lowers the bar)
    img = _square(640, 640, (320, 320, 416, 416))
    blobs = []
    for arr in (img, np.full((640, 640, 3), 10, np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table({
        "image_id": ["a", "b"], "status": ["kept", "kept"], "drop_stage": [None, None],
        "reason": [None, None], "detail": [None, None], "image_bytes": blobs,
    })  # fmt: skip
    faces = {"backend": "insightface", "model_dir": str(pack)}
    lenient = {"filter": {"min_area_fraction": 0.01, "min_face_px": 0, "min_sharpness": 0}}
    out = run_stages(table, faces=faces, settings=lenient).drop_columns(["image_bytes"])
    a, b = out.to_pylist()
    assert a["face_count"] == 1 and np.allclose(a["face_box"], [320, 320, 416, 416]), (a["face_box"], a["detail"])
    assert a["status"] == "kept" and a["face_backend"] == "insightface" and len(a["embedding"]) == 512
    assert a["embedding_model"] == "insightface:buffalo_l/w600k_r50.onnx" and len(a["landmarks68"]) == 136
    assert Image.open(io.BytesIO(a["face_crop"])).size == (256, 256)
    assert (b["status"], b["reason"]) == ("dropped", "no_face")


def test_a_stage_worker_gives_onnxruntime_its_cpu_share(pack):
    from datakit.stages.detect import DetectStage

    context = {"faces": FaceSettings(backend="insightface", model_dir=str(pack))}
    stage = DetectStage(DetectStage.Settings(num_cpus=0.5), context)
    stage.setup()
    assert stage.backend.detector.session.get_session_options().intra_op_num_threads == 1
    wide = DetectStage(DetectStage.Settings(num_cpus=2), {"faces": {**context["faces"].model_dump(), "threads": 3}})
    wide.setup()
    assert wide.backend.recognizer.session.get_session_options().intra_op_num_threads == 3


def test_batched_runs_give_the_one_at_a_time_results(tmp_path_factory):
    """Detection on batches of letterboxed images, recognition and gender/age on batches of
    aligned faces (portrait/faces/batched.py) against insightface's own one-at-a-time code."""
    from portrait.faces import batched

    folder = write_pack(tmp_path_factory.mktemp("batched") / "buffalo_l", landmarks68=False, batched=True)
    settings = {"backend": "insightface", "model_dir": str(folder), "threads": 1}
    one = load_backend(FaceSettings(**settings, batch_size=1))
    many = load_backend(FaceSettings(**settings, batch_size=4))
    assert one.batched_detector is None and many.batched_detector is not None
    two = _square(480, 640, (64, 64, 160, 160))
    two[256:352, 384:480] = 250
    images = [
        _square(300, 400, (150, 100, 250, 200)),
        _square(1500, 2000, (750, 500, 1250, 1000)),  # shrunk to the 640 copy
        two,
        np.full((300, 400, 3), 10, np.uint8),  # no face: the padded retry runs as a second batch
        _square(400, 300, (100, 150, 200, 250)),  # portrait: letterboxed on the other side
    ]  # two batches: 4 + 1
    found, expected = many.detect_many(images), [one.detect(img) for img in images]
    assert [len(f) for f in found] == [len(f) for f in expected] and len(found[2]) == 2 and found[3] == []
    for a, b in zip(sum(found, []), sum(expected, [])):
        assert np.allclose(a.box, b.box, atol=1e-3) and np.allclose(a.landmarks5, b.landmarks5, atol=1e-3)
        assert abs(a.score - b.score) < 1e-5
    copies = [np.ascontiguousarray(img[:320, :320]) for img in images[:3]]
    plain, bound = (batched.BatchedDetector(many.detector, bind=b).detect(copies, 320, 0.5) for b in (False, True))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(plain, bound))  # the I/O binding path

    items = [(img, faces[0]) for img, faces in zip(images, expected) if faces]
    items.append((np.full_like(images[0], 5), items[0][1]))  # a dark crop: the test model says female
    for (vector, crop), (img, face) in zip(many.embed_many(items, 128), items):
        alone, alone_crop = one.embed(img, face, 128)
        assert np.allclose(vector, alone, atol=1e-5) and np.array_equal(crop, alone_crop)
    ages = many.age_gender_many(items)
    assert ages == [one.age_gender(img, face) for img, face in items]
    assert {gender for _, gender in ages} == {"male", "female"}

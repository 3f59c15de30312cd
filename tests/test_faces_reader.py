"""Inference sees the faces training saw: the trainer's path from a photo file to its face
(trainer.infer.open_photo -> trainer.pipeline.analyse_photos -> portrait.faces.reader) gives the
box, landmarks, aligned-crop bytes and embedding that the detect and embed stages recorded for
the same file, with dlib and with insightface (the test ONNX pack of tests/onnx_models.py)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from face_pipeline import DEV, input_table, run_stages, sources

from portrait.faces.base import Face
from portrait.faces.reader import CropSettings, FaceReader, build_file_for, read_config, record
from portrait.faces.subject import SubjectSettings
from trainer.infer import open_photo
from trainer.pipeline import analyse_photos

pytestmark = pytest.mark.usefixtures("faces_dir")


def fixture_photos(count: int, every: int = 29) -> list:
    rows = sources(DEV)
    return [DEV / r["file"] for r in rows[::every][:count]]


def manifest_rows(paths, faces: dict | None, settings: dict | None = None) -> list[dict]:
    table = run_stages(input_table(paths), faces=faces, stages=("detect", "embed"), settings=settings)
    return table.drop_columns(["image_bytes"]).to_pylist()


def f32(values) -> list[float]:
    return np.asarray(values, dtype=np.float32).reshape(-1).tolist()


def web_size_copy(path, folder) -> object:
    """The photo enlarged to 2,600 px on its longer side, as the web serves it: the build and
    inference decode it at a reduced scale."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    factor = 2600 / max(image.size)
    large = folder / f"large-{path.name}"
    image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS).save(large, quality=92)
    return large


def assert_inference_equals_manifest(paths, rows, reader) -> int:
    """Every photo: no face on both sides, or the same face to the byte. Returns faces compared.
    The manifest holds the full image's coordinates; inference reads the face in the pixels the
    face stages saw, so its coordinates times that decode's scale (a power of two) are the same."""
    from PIL import Image

    compared = 0
    for path, row in zip(paths, rows):
        photo = open_photo(str(path), reader)
        if row["status"] != "kept":
            assert row["reason"] == "no_face" and reader.read(photo) is None, path
            continue
        scale = Image.open(path).size[0] / photo.shape[1]
        (face,) = analyse_photos([photo], reader, names=[str(path)])
        assert f32(np.asarray(face.box) * scale) == f32(row["face_box"]), path
        assert f32(face.landmarks5 * scale) == f32(row["landmarks5"]), path
        assert (face.landmarks68 is None) == (row["landmarks68"] is None)
        if face.landmarks68 is not None:
            assert f32(face.landmarks68 * scale) == f32(row["landmarks68"]), path
        assert face.crop == row["face_crop"], path  # the JPEG bytes the shards hold as K.face.jpg
        assert f32(face.embedding) == f32(row["embedding"]), path
        assert face.embedding_model == row["embedding_model"]
        compared += 1
    return compared


def test_dlib_inference_faces_equal_the_manifest(tmp_path):
    paths = fixture_photos(6)
    paths.append(web_size_copy(paths[1], tmp_path))  # decoded at 1/2 scale by the build and by inference
    crop = {"crop_size": 192, "crop_padding": 0.3, "jpeg_quality": 90}  # not the defaults: they must travel
    rows = manifest_rows(paths, {"backend": "dlib"}, {"embed": crop})
    # the settings as inference gets them: a recipe-shaped file (what build.json records) ...
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"faces": {"backend": "dlib"}, "stages": {"embed": crop}}))
    reader = FaceReader.from_config(config)
    assert reader.crop == CropSettings(192, 0.3, 90)
    assert rows[-1]["status"] == "kept" and max(open_photo(str(paths[-1]), reader).shape) <= 1300  # reduced
    assert assert_inference_equals_manifest(paths, rows, reader) >= 5
    # ... and the record a training run keeps (faces.json) gives the same reader
    again = FaceReader.from_record(record(*read_config(config)))
    assert again.crop == reader.crop and again.settings == reader.settings
    # default crop settings would not match: the comparison above can fail
    kept = next(i for i, r in enumerate(rows) if r["status"] == "kept")
    (default,) = analyse_photos([open_photo(str(paths[kept]), reader)], FaceReader({"backend": "dlib"}))
    assert default.crop != rows[kept]["face_crop"]


def test_insightface_inference_faces_equal_the_manifest(tmp_path):
    from onnx_models import write_pack

    recipe_dir = tmp_path / "recipe"
    pack = write_pack(recipe_dir / "models" / "buffalo_l")
    faces = {"backend": "insightface", "model_dir": "models/buffalo_l"}  # relative to the recipe, as in a build
    paths = fixture_photos(12, every=11)
    table = run_stages(input_table(paths), faces=faces, stages=("detect", "embed"), recipe_dir=recipe_dir)
    rows = table.drop_columns(["image_bytes"]).to_pylist()
    config = recipe_dir / "recipe.yaml"
    config.write_text(yaml.safe_dump({"faces": faces}))
    reader = FaceReader.from_config(config)  # model_dir found from the recipe's folder
    assert reader.backend.name == "insightface" and reader.embedding_dim == 512
    assert record(reader.settings, reader.crop, recipe_dir)["faces"]["model_dir"] == str(pack.resolve())
    assert assert_inference_equals_manifest(paths, rows, reader) >= 1


def test_the_build_json_beside_the_shards_is_found(tmp_path):
    (tmp_path / "out" / "shards").mkdir(parents=True)
    assert build_file_for(tmp_path / "out" / "shards") is None
    (tmp_path / "out" / "build.json").write_text('{"recipe": {"faces": {"backend": "dlib"}}, "recipe_file": "/r/x.yaml"}')
    assert build_file_for(tmp_path / "out" / "shards") == tmp_path / "out" / "build.json"
    assert build_file_for(str(tmp_path / "out" / "shards" / "*.tar")) == tmp_path / "out" / "build.json"
    settings, crop, base, _ = read_config(tmp_path / "out" / "build.json")
    assert settings.backend == "dlib" and crop == CropSettings() and str(base) == "/r"
    bad = tmp_path / "bad.yaml"
    bad.write_text("faces: {backend: nosuch}\n")
    with pytest.raises(ValueError, match="bad.yaml: face settings"):
        read_config(bad)


def test_training_records_the_builds_face_settings_for_inference(tmp_path):
    import json

    from trainer.train import record_faces

    build = tmp_path / "out"
    (build / "shards").mkdir(parents=True)
    recipe = {"faces": {"backend": "dlib", "detect_max_side": 512},
              "stages": {"embed": {"crop_size": 200}, "detect": {"min_score": 0.5, "full_score": 2}}}  # fmt: skip
    (build / "build.json").write_text(json.dumps({"recipe": recipe, "recipe_file": str(tmp_path / "r.yaml")}))
    run = tmp_path / "run"
    run.mkdir()
    faces = record_faces(str(build / "shards"), run, main=True)
    assert json.loads((run / "faces.json").read_text()) == faces
    reader = FaceReader.from_record(faces)
    assert reader.settings.detect_max_side == 512 and reader.crop == CropSettings(size=200)
    assert reader.subject == SubjectSettings(min_score=0.5, full_score=2.0)
    # a record written before the subject settings were: the backend's defaults
    assert FaceReader.from_record({k: v for k, v in faces.items() if k != "subject"}).subject == SubjectSettings()
    assert record_faces(str(tmp_path / "elsewhere"), run, main=True) is None


class ListedFaces:
    """A detector that finds the faces it is given (the choice among them is under test)."""

    name, embedding_model, embedding_dim = "dlib", "listed", 1

    def __init__(self, faces):
        self.found = faces

    def detect(self, rgb):
        return list(self.found)


def test_the_reader_picks_the_subject_with_the_builds_score_thresholds(tmp_path):
    """The detect stage's min_score and full_score reach the reader (from the recipe and from
    the run's record). dlib's defaults count a face in full from score 1.0: a 70 px face scoring
    1.0 beats a 100 px one scoring 0.4; counted in full from 0.4, size decides; with a floor of
    0.5 the 0.4 face does not compete at all."""
    points = np.zeros((5, 2))
    large, small = Face((0, 0, 100, 100), 0.4, points), Face((130, 0, 200, 70), 1.0, points)
    image = np.zeros((200, 200, 3), dtype=np.uint8)

    def first(detect: dict):
        config = tmp_path / "recipe.yaml"
        config.write_text(yaml.safe_dump({"faces": {"backend": "dlib"}, "stages": {"detect": detect}}))
        settings, crop, base, subject = read_config(config)
        reader = FaceReader(settings, crop, base, backend=ListedFaces([small, large]), subject=subject)
        assert FaceReader.from_record(record(settings, crop, base, subject)).subject == subject
        return reader.faces(image)[0]

    assert first({}) is small
    assert first({"full_score": 0.4}) is large
    assert first({"full_score": 0.4, "min_score": 0.5}) is small


def test_trainer_has_no_face_model_code_of_its_own():
    """trainer/ reads faces only through portrait: no dlib, insightface or onnxruntime of its own."""
    from pathlib import Path

    trainer = Path(__file__).resolve().parent.parent / "trainer"
    for path in trainer.glob("*.py"):
        text = path.read_text()
        for word in ("import dlib", "import insightface", "from insightface", "onnxruntime", "face_recognition_models", "import datakit", "from datakit"):
            assert word not in text, f"{path.name} mentions {word}"


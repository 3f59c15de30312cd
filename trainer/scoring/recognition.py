"""Face-similarity scorers: several recognition models on one detection.

Every image's face is found once, by the protocol's face reader (``portrait.faces.reader``, the
build's backend, box convention and landmarks); each recognition model then embeds that face
from its own alignment and the similarity is the mean cosine to the identity's reference faces
embedded by the same model. Cross-paper figures differ by recognition model, so every figure is
reported with its model's name and file hash, and whether that model is the one that conditions
the generator (a generator is easily good at the measure it was conditioned on).

- ``dlib``: dlib's 128-d ResNet (``dlib_face_recognition_resnet_model_v1``, from the
  face-recognition-models package), on its own 150 px chip.
- ``arcface``: an ArcFace ONNX file from a local path (insightface's ``w600k_r50.onnx`` or
  ``glintr100.onnx``), run by ``insightface.model_zoo`` on insightface's 112 px ``norm_crop`` of
  the five landmarks, as insightface itself does. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from portrait.faces.base import Face


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Recognizer:
    name: str
    model: str  # the model's name as figures should quote it
    model_sha256: str
    backend: str  # the face backend whose embedding this is, for "conditions the generator"

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        raise NotImplementedError

    def similarity(self, embedding: np.ndarray, references: list[np.ndarray]) -> float:
        return float(np.mean([float(embedding @ r) for r in references]))


class DlibRecognizer(Recognizer):
    backend = "dlib"

    def __init__(self, name: str, backend=None):
        """``backend``: a loaded dlib backend to share (the face reader's), else one is loaded."""
        from portrait.faces import load_backend, model_provenance

        self.name = name
        self._backend = backend if backend is not None and backend.name == "dlib" else load_backend({"backend": "dlib"})
        self.model = self._backend.embedding_model
        self.model_sha256 = model_provenance({"backend": "dlib"})["files"]["recognition"]["sha256"]

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        vector, _ = self._backend.embed(rgb, face, crop_size=64)
        return np.asarray(vector, dtype=np.float32)


class ArcFaceRecognizer(Recognizer):
    backend = "insightface"

    def __init__(self, name: str, path: Path, providers: list | None = None):
        from insightface.model_zoo import model_zoo

        if not path.is_file():
            raise FileNotFoundError(
                f"recognizer {name}: {path} not found; give the path of a local ArcFace ONNX file "
                "(insightface's buffalo_l/w600k_r50.onnx or antelopev2/glintr100.onnx; see portrait/faces/insightface_backend.py)"
            )
        self.name = name
        self.session = model_zoo.get_model(str(path), providers=providers or ["CPUExecutionProvider"])
        if getattr(self.session, "taskname", None) != "recognition":
            raise ValueError(f"recognizer {name}: {path} is not a recognition model by its inputs and outputs")
        self.session.prepare(-1)
        self.model = f"arcface:{path.name}"
        self.model_sha256 = sha256_file(path)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils import face_align

        bgr = np.ascontiguousarray(rgb[..., ::-1])
        side = int(self.session.input_size[0])
        aligned = face_align.norm_crop(bgr, landmark=np.asarray(face.landmarks5, dtype=np.float32), image_size=side)
        vector = np.asarray(self.session.get_feat(aligned), dtype=np.float32).reshape(-1)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def load_recognizers(specs, resolve, backend=None) -> list[Recognizer]:
    """The protocol's recognizers; ``resolve`` turns a protocol path into a Path; ``backend``: the
    face reader's, shared when it is the same model."""
    out: list[Recognizer] = []
    for spec in specs:
        if spec.kind == "dlib":
            out.append(DlibRecognizer(spec.name, backend))
        else:
            out.append(ArcFaceRecognizer(spec.name, resolve(spec.model)))
    return out

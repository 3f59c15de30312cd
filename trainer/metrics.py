"""Face metrics for validation, with dlib and the models of face-recognition-models.

The trainer cannot import datakit (data flows one way), so this module calls dlib directly:
HOG face detector, 68-point shape predictor, 128-d ResNet identity embedding, aligned face chip.
It serves validation (face similarity and landmark error of generated images) and the inference
CLI (reference crops and embeddings from photos, driving landmarks).

Face similarity is the cosine between the generated face's embedding and each reference's, with
every embedding made by this same model, so it is comparable whatever backend built the shards.
A generated image where the detector finds no face is a *miss*: counted and reported, never
averaged in as zero or left out silently.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from portrait.landmarks import landmark_error

DETECT_MIN_SIDE = 256  # HOG finds faces from ~80 px; small generated images are upscaled first


def _model_dir() -> Path | None:
    # find the package's files without importing it (it imports pkg_resources)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def dlib_unavailable_reason() -> str | None:
    try:
        import dlib  # noqa: F401
    except ImportError:
        return "dlib is not installed (pip package dlib-bin)"
    folder = _model_dir()
    if folder is None:
        return "face-recognition-models is not installed"
    for name in ("shape_predictor_68_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    return None


@dataclass
class FaceResult:
    box: tuple[float, float, float, float]  # dlib's box, pixels of the image passed in
    landmarks: np.ndarray  # (68, 2)
    embedding: np.ndarray  # (128,), L2-normalised
    chip: Image.Image  # aligned face crop


class DlibFaces:
    embedding_dim = 128

    def __init__(self, chip_size: int = 256, chip_padding: float = 0.25):
        reason = dlib_unavailable_reason()
        if reason:
            raise RuntimeError(f"dlib face models unavailable: {reason}")
        import dlib

        folder = _model_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(folder / "shape_predictor_68_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
        self.chip_size = chip_size
        self.chip_padding = chip_padding

    def _rgb(self, image) -> np.ndarray:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        return np.ascontiguousarray(image, dtype=np.uint8)

    def detect(self, image) -> list[tuple[float, float, float, float]]:
        """Face boxes, largest first. Small images are upscaled for the detector."""
        rgb = self._rgb(image)
        scale = max(1.0, DETECT_MIN_SIDE / min(rgb.shape[:2]))
        work = rgb
        if scale > 1.0:
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            work = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
        rects = self.detector(work, 1 if min(work.shape[:2]) < 512 else 0)
        boxes = [(r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale) for r in rects]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)

    def analyze(self, image, box=None) -> FaceResult | None:
        """Landmarks, embedding and chip of the largest face, or of the face in ``box``."""
        rgb = self._rgb(image)
        if box is None:
            boxes = self.detect(rgb)
            if not boxes:
                return None
            box = boxes[0]
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self.shape_predictor(rgb, rect)
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        embedding = np.asarray(self.encoder.compute_face_descriptor(rgb, shape), dtype=np.float32)
        embedding /= np.linalg.norm(embedding) or 1.0
        chip = self._dlib.get_face_chip(rgb, shape, size=self.chip_size, padding=self.chip_padding)
        return FaceResult(tuple(float(v) for v in box), landmarks, embedding, Image.fromarray(chip))


def face_metrics(faces: DlibFaces, generated: Image.Image, reference_embeddings: list[np.ndarray], target_landmarks):
    """Similarity to the references and landmark error of one generated image, or a miss."""
    result = faces.analyze(generated)
    if result is None:
        return {"detected": False, "similarity": None, "landmark_error": None}
    similarity = float(np.mean([float(result.embedding @ ref) for ref in reference_embeddings])) if reference_embeddings else None
    error = landmark_error(result.landmarks, target_landmarks) if target_landmarks is not None else None
    return {"detected": True, "similarity": similarity, "landmark_error": error}


def summarise(rows: list[dict], reference_misses: int = 0) -> dict:
    detected = [r for r in rows if r["detected"]]
    sims = [r["similarity"] for r in detected if r["similarity"] is not None]
    errors = [r["landmark_error"] for r in detected if r["landmark_error"] is not None]
    return {
        "images": len(rows),
        "faces_detected": len(detected),
        "detector_misses": len(rows) - len(detected),
        "reference_misses": reference_misses,
        "face_similarity": float(np.mean(sims)) if sims else None,
        "landmark_error": float(np.mean(errors)) if errors else None,
    }

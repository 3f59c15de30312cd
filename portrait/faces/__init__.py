"""The face toolkit both halves use: datakit's detect, filter, embed and attributes stages, and
the trainer's inference and validation (``portrait.faces.reader``), so that a photo gets the same
box, landmarks, aligned crop and embedding at inference as it got in the build.

A recipe's top-level ``faces:`` section picks the backend and is validated by ``FaceSettings``;
``load_backend`` builds the backend once per worker (each stage's ``setup``)::

    faces:
      backend: dlib            # dlib (offline default) | insightface
      detector: hog            # dlib only: hog | cnn (mmod, slow on CPU)
      detect_max_side: 640     # detection runs on a copy no longer than this ...
      detect_min_side: 200     # ... and no shorter than this (small images are enlarged)

    faces:
      backend: insightface
      model_dir: models/buffalo_l   # a model pack folder in insightface's layout
      device: cuda                  # onnxruntime's CUDA provider, CPU as fallback
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from portrait.faces.base import Face, FaceBackend

__all__ = ["Face", "FaceBackend", "FaceSettings", "default_thresholds", "load_backend", "model_provenance"]


class FaceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["dlib", "insightface"] = "dlib"  # dlib (offline default) or insightface (ONNX models from model_dir)
    # dlib: a folder holding the face_recognition_models .dat files (default: that package's own);
    # insightface: the model pack folder, e.g. ~/.insightface/models/buffalo_l (required).
    model_dir: str | None = None
    # insightface: which file layout model_dir follows (default: the folder's name when it is one)
    model_pack: Literal["buffalo_l", "antelopev2"] | None = None
    detector: Literal["hog", "cnn"] = "hog"  # dlib only: hog, or cnn (mmod, slow on CPU)
    detect_max_side: int = Field(default=640, ge=64, le=4096)  # detection runs on a copy no longer than this
    detect_min_side: int = Field(default=200, ge=32, le=4096)  # and no shorter than this (small images are enlarged)
    # border added (fraction of the copy's longer side) for a second try when no face is found
    detect_pad: float = Field(default=0.25, ge=0.0, le=1.0)
    # dlib: a last try on the copy enlarged twice when nothing is found, so that photos of small
    # faces are dropped for their size rather than as "no face" (costs ~4x detection on those)
    detect_upsample_on_miss: bool = True
    # detector score threshold; null = the backend's default (dlib 0.0, insightface 0.5)
    min_score: float | None = None
    device: Literal["cpu", "cuda"] = "cpu"  # where the ONNX models run (insightface backend; dlib is CPU only)
    gpu_id: int = Field(default=0, ge=0)  # which GPU with device: cuda (Ray sets CUDA_VISIBLE_DEVICES per actor)
    # onnxruntime providers; null = from device (CUDA then CPU, or CPU alone)
    providers: list[str] | None = None
    # onnxruntime intra-op threads per worker; null = onnxruntime's default (all cores)
    threads: int | None = Field(default=None, ge=1)
    # images (detection) or faces (recognition, gender/age) per model call; insightface batches
    # them where its model takes batches (portrait/faces/batched.py), dlib runs one at a time
    batch_size: int = Field(default=16, ge=1, le=1024)

    @model_validator(mode="after")
    def _check(self) -> FaceSettings:
        if self.detect_min_side > self.detect_max_side:
            raise ValueError(
                f"detect_min_side ({self.detect_min_side}) is larger than detect_max_side ({self.detect_max_side})"
            )
        if self.backend != "dlib" and self.detector != "hog":
            raise ValueError("detector applies to the dlib backend only (insightface uses its pack's detector)")
        if self.backend == "insightface" and not self.model_dir:
            raise ValueError(
                "the insightface backend needs model_dir: a folder with an insightface model pack "
                "(buffalo_l or antelopev2); see portrait/faces/insightface_backend.py for how to obtain one"
            )
        return self

    def onnx_providers(self) -> list:
        if self.providers:
            return list(self.providers)
        if self.device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.gpu_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]


def _resolve(settings: FaceSettings | dict | None, base_dir) -> tuple[FaceSettings, Path | None]:
    if not isinstance(settings, FaceSettings):
        settings = FaceSettings.model_validate(settings or {})
    model_dir = None
    if settings.model_dir:
        model_dir = Path(settings.model_dir).expanduser()
        if not model_dir.is_absolute() and base_dir is not None:
            model_dir = Path(base_dir) / model_dir
    return settings, model_dir


def load_backend(settings: FaceSettings | dict | None, base_dir: str | Path | None = None) -> FaceBackend:
    """Build the configured backend; a relative ``model_dir`` is taken from ``base_dir``
    (the recipe's folder)."""
    settings, model_dir = _resolve(settings, base_dir)
    if settings.backend == "dlib":
        from portrait.faces.dlib_backend import DlibBackend

        return DlibBackend(settings, model_dir)
    from portrait.faces.insightface_backend import InsightFaceBackend

    return InsightFaceBackend(settings, model_dir)


def model_provenance(settings: FaceSettings | dict | None, base_dir: str | Path | None = None) -> dict:
    """Backend, embedding model and sha256 of every weight file it would load (for build.json)."""
    settings, model_dir = _resolve(settings, base_dir)
    if settings.backend == "dlib":
        from portrait.faces import dlib_backend as module
    else:
        from portrait.faces import insightface_backend as module
    files = module.model_files(settings, model_dir)
    return {
        "backend": settings.backend,
        "settings": settings.model_dump(mode="json"),
        "files": {role: {"path": str(p), "sha256": _sha256(str(p))} for role, p in sorted(files.items())},
    }


@lru_cache(maxsize=64)
def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_thresholds(kind: str) -> dict[str, float]:
    """Identity-distance thresholds of every backend's embedding models, for ``kind`` "dedup"
    (the same picture), "cluster" (the same person) or "attach" (label-guided: a photo staying with its own name): {pattern in the embedding_model name:
    L2 distance between L2-normalised embeddings}. Each backend module states and explains its
    own (``THRESHOLDS``), beside the model that makes the embedding."""
    from portrait.faces import dlib_backend, insightface_backend

    return {pattern: values[kind] for module in (dlib_backend, insightface_backend) for pattern, values in module.THRESHOLDS.items()}

"""One photo's face exactly as a build records it, for the build and for the trainer.

The detect stage records the subject (``geometry.subject_first``) with its box, score and
landmarks at the manifest's float32 precision; the embed stage reads that record back and
computes the embedding and the aligned crop (``crop_size``, ``crop_padding``), kept as JPEG at
``jpeg_quality``. ``FaceReader.read`` does the same steps in one call, with the same backend and
settings, so the trainer's inference and validation see a photo's face as training did: the
same box (the backend's RetinaFace-convention box), landmarks, crop bytes and embedding.

Which face is the subject: the one the detect stage picks with the build's ``detect.min_score``
and ``detect.full_score`` (``subject.SubjectSettings``; the backend's defaults when the recipe
leaves them unset), so a recipe that changes them changes the reader's choice too.

Which settings: ``FaceReader.from_config(path)`` takes a build's ``build.json``, a recipe, or a
file holding just a ``faces:`` section (plus optional ``crop:`` and ``subject:`` ones);
``FaceReader.for_shards(shards)`` finds the ``build.json`` of the build the shards came from
(``OUTPUT/build.json`` beside ``OUTPUT/shards``). A relative ``model_dir`` is taken from the
recipe's folder, as in the build; an insightface model pack therefore loads from the same local
folder at inference as in the build.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from portrait.decode import DEFAULT_MAX_PIXELS, load_rgb, load_rgb_array
from portrait.faces import FaceSettings, load_backend
from portrait.faces.base import Face, FaceBackend
from portrait.faces.geometry import subject_first
from portrait.faces.subject import SubjectSettings

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class CropSettings:
    """The aligned crop the embed stage keeps (the face refiner's input); its stage settings'
    defaults are these."""

    size: int = 256
    padding: float = 0.25
    jpeg_quality: int = 95


def crop_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def embed_face(backend: FaceBackend, rgb: np.ndarray, face: Face, crop: CropSettings) -> tuple[np.ndarray, bytes]:
    """(float32 embedding, aligned crop as JPEG) of a recorded face: the embed stage's step and
    the reader's."""
    return embed_faces(backend, [(rgb, face)], crop)[0]


def embed_faces(backend: FaceBackend, items: list[tuple[np.ndarray, Face]], crop: CropSettings) -> list[tuple[np.ndarray, bytes]]:
    """``embed_face`` over many faces, batched where the backend batches."""
    return [
        (np.asarray(vector, dtype=np.float32), crop_jpeg(pixels, crop.jpeg_quality))
        for vector, pixels in backend.embed_many(items, crop_size=crop.size, crop_padding=crop.padding)
    ]


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def as_recorded(face: Face) -> Face:
    """The face as the manifest stores it (float32 coordinates, no detector box of its own) and
    as the embed stage reads it back: embedding and crop are computed from this."""
    return Face(
        box=tuple(float(v) for v in _f32(face.box)),
        score=float(np.float32(face.score)),
        landmarks5=_f32(face.landmarks5).reshape(5, 2),
        landmarks68=None if face.landmarks68 is None else _f32(face.landmarks68).reshape(68, 2),
    )


@dataclass
class FaceReading:
    """The subject's face of one photo, as the manifest and the shards hold it."""

    box: tuple[float, float, float, float]  # RetinaFace convention, pixels of the photo
    score: float
    landmarks5: np.ndarray  # (5, 2)
    landmarks68: np.ndarray | None  # (68, 2) when the backend gives them
    embedding: np.ndarray  # float32, L2-normalised
    embedding_model: str
    crop: bytes  # the aligned crop, JPEG, as K.face.jpg

    @property
    def landmarks(self) -> np.ndarray:
        """The points a sample's landmarks.npy holds: 68 when there are, else 5 (float32)."""
        points = self.landmarks68 if self.landmarks68 is not None else self.landmarks5
        return np.asarray(points, dtype=np.float32)

    def crop_image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.crop)).convert("RGB")


class FaceReader:
    def __init__(
        self,
        settings: FaceSettings | dict | None = None,
        crop: CropSettings | None = None,
        base_dir: str | Path | None = None,
        backend: FaceBackend | None = None,
        subject: SubjectSettings | None = None,
    ):
        self.settings = settings if isinstance(settings, FaceSettings) else FaceSettings.model_validate(settings or {})
        self.crop = crop or CropSettings()
        self.subject = subject or SubjectSettings()
        self.backend = backend or load_backend(self.settings, base_dir)

    @property
    def embedding_model(self) -> str:
        return self.backend.embedding_model

    @property
    def embedding_dim(self) -> int:
        return int(self.backend.embedding_dim)

    # -------------------------------------------------------------- settings

    @classmethod
    def from_config(cls, path: str | Path) -> FaceReader:
        settings, crop, base_dir, subject = read_config(path)
        return cls(settings, crop, base_dir, subject=subject)

    @classmethod
    def from_record(cls, record: dict) -> FaceReader:
        """The reader a ``record`` (see ``record``) describes."""
        subject = SubjectSettings(**record.get("subject", {}))  # runs recorded before it: the defaults
        return cls(FaceSettings.model_validate(record["faces"]), CropSettings(**record["crop"]), subject=subject)

    @classmethod
    def for_shards(cls, shards) -> FaceReader:
        """The reader of the build that wrote ``shards``; FileNotFoundError when no build.json
        is found beside them."""
        found = build_file_for(shards)
        if found is None:
            raise FileNotFoundError(
                f"no {BUILD_FILE} beside the shards {shards!r} (looked in their folder and its parent); "
                "give the face settings of the build that made them (a build.json, its recipe or a faces: section)"
            )
        return cls.from_config(found)

    # -------------------------------------------------------------- reading

    def load_photo(self, data: bytes) -> np.ndarray:
        """The pixels the build's face stages look at for these bytes: a JPEG at least twice
        ``detect_max_side`` is decoded at a reduced scale (1/2, 1/4, 1/8), others in full. Faces
        read from them are in their frame; the manifest's coordinates are those times the scale,
        a power of two, so box, landmarks, crop and embedding come out as the build's."""
        return load_rgb_array(data, self.settings.detect_max_side)[0]

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """Every face, the subject first (the detect stage's order)."""
        return subject_first(self.backend.detect(rgb), rgb.shape[0], rgb.shape[1], self.backend.name, self.subject)

    def read(self, rgb: np.ndarray) -> FaceReading | None:
        """The subject's face, or None when the backend finds none."""
        faces = self.faces(rgb)
        return self.read_face(rgb, faces[0]) if faces else None

    def read_face(self, rgb: np.ndarray, face: Face) -> FaceReading:
        recorded = as_recorded(face)
        embedding, crop = embed_face(self.backend, rgb, recorded, self.crop)
        return FaceReading(
            box=recorded.box,
            score=recorded.score,
            landmarks5=recorded.landmarks5,
            landmarks68=recorded.landmarks68,
            embedding=embedding,
            embedding_model=self.backend.embedding_model,
            crop=crop,
        )


def load_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A photo's bytes as the build decodes them (``portrait.decode``): HxWx3 uint8 RGB."""
    return np.array(load_rgb(data, max_pixels), dtype=np.uint8)


# ------------------------------------------------------------------ finding the settings


def read_config(path: str | Path) -> tuple[FaceSettings, CropSettings, Path | None, SubjectSettings]:
    """(face settings, crop settings, folder a relative model_dir is taken from, subject
    settings) of a build.json, a recipe (``stages.embed`` and ``stages.detect``), or a file with
    a ``faces:`` section (and optionally ``crop:`` and ``subject:``)."""
    import fsspec
    import yaml

    try:
        with fsspec.open(str(path), "rt") as f:  # a local path or an object-store URL
            data = yaml.safe_load(f.read())  # JSON is YAML
    except (OSError, yaml.YAMLError) as exn:
        raise ValueError(f"{path}: cannot read face settings ({exn})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a build.json, a recipe or a mapping with a faces: section")
    base_dir = None if "://" in str(path) else Path(path).parent
    if "recipe" in data and isinstance(data["recipe"], dict):  # a build.json
        if data.get("recipe_file"):
            base_dir = Path(data["recipe_file"]).parent
        data = data["recipe"]
    faces = data.get("faces")
    if faces is None and not ("stages" in data or "crop" in data):
        faces = data  # the file is the faces section itself
    stages = data.get("stages") if isinstance(data.get("stages"), dict) else {}
    embed, detect = stages.get("embed") or {}, stages.get("detect") or {}
    crop = data.get("crop") or {}
    chooser = data.get("subject") or detect
    try:
        settings = FaceSettings.model_validate(faces or {})
        defaults = CropSettings()
        crop_settings = CropSettings(
            size=int(crop.get("size", embed.get("crop_size", defaults.size))),
            padding=float(crop.get("padding", embed.get("crop_padding", defaults.padding))),
            jpeg_quality=int(crop.get("jpeg_quality", embed.get("jpeg_quality", defaults.jpeg_quality))),
        )
        subject = SubjectSettings(**{k: None if chooser.get(k) is None else float(chooser[k]) for k in ("min_score", "full_score")})
    except (ValueError, TypeError, AttributeError) as exn:
        raise ValueError(f"{path}: face settings: {exn}") from None
    return settings, crop_settings, base_dir, subject


def record(settings: FaceSettings, crop: CropSettings, base_dir: str | Path | None,
           subject: SubjectSettings = SubjectSettings()) -> dict:  # fmt: skip
    """Face, crop and subject settings as JSON, with ``model_dir`` made absolute, so they can be
    kept (the trainer keeps them in its run folder) and used from anywhere."""
    faces = settings.model_dump(mode="json")
    if faces.get("model_dir"):
        model_dir = Path(faces["model_dir"]).expanduser()
        if not model_dir.is_absolute() and base_dir is not None:
            model_dir = Path(base_dir) / model_dir
        faces["model_dir"] = str(model_dir.resolve())
    return {
        "faces": faces,
        "crop": {"size": crop.size, "padding": crop.padding, "jpeg_quality": crop.jpeg_quality},
        "subject": {"min_score": subject.min_score, "full_score": subject.full_score},
    }


def record_for_shards(shards) -> dict | None:
    """The record of the build that wrote ``shards`` (from its build.json), or None."""
    found = build_file_for(shards)
    return None if found is None else record(*read_config(found))


def build_file_for(shards) -> str | Path | None:
    """The build.json of the build whose shards ``shards`` names (a folder, a glob, a tar or a
    list of tars; local or an object-store URL), looked for in the shards' folder and its
    parent; None when there is none."""
    import fsspec

    first = str(shards[0]) if isinstance(shards, (list, tuple)) and shards else str(shards)
    if "://" in first:
        fs, path = fsspec.core.url_to_fs(first)
        protocol = first.split("://", 1)[0]
        folder = path.rstrip("/") if not any(c in path for c in "*?[{") and fs.isdir(path) else path.rsplit("/", 1)[0]
        for candidate in (f"{folder}/{BUILD_FILE}", f"{folder.rsplit('/', 1)[0]}/{BUILD_FILE}"):
            if fs.isfile(candidate):
                return f"{protocol}://{candidate}"
        return None
    path = Path(first)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / BUILD_FILE, folder.parent / BUILD_FILE):
        if candidate.is_file():
            return candidate
    return None

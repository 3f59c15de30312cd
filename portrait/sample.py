"""The shard sample: one definition for the writer (datakit's shard stage), the checkers
(``datakit verify``, ``redact``) and the reader (the trainer).

A sample keyed ``K`` (the image_id) holds, in this order:

    K.jpg            the image, RGB JPEG, longest side at most the recipe's ``shard.image_size``
    K.face.jpg       the aligned face crop the embed stage made (the face refiner's input)
    K.json           the fields of ``FIELDS``; coordinates in K.jpg's pixels
    K.embedding.npy  float32 [D] L2-normalised identity embedding
    K.landmarks.npy  float32 [68, 2] (or [5, 2] when the backend gives no 68 points): the JSON's
                     ``landmarks68`` (else ``landmarks5``) as an array

Every member is required: a training example needs the image, the crop, the identity, the
embedding and the landmarks. ``encode`` refuses to make a sample that ``validate`` would reject,
and ``parse`` (the trainer's reader) accepts exactly what ``validate`` accepts, so a sample that
``datakit verify`` passes is one the trainer reads.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from portrait.ids import check_key

# suffix -> what it holds, in the order members are written
MEMBERS: dict[str, str] = {
    "jpg": "the image (JPEG)",
    "face.jpg": "aligned face crop (JPEG)",
    "json": "metadata (FIELDS)",
    "embedding.npy": "float32 [D] identity embedding",
    "landmarks.npy": "float32 [68, 2] or [5, 2] landmarks in the image's pixels",
}
REQUIRED_MEMBERS = tuple(MEMBERS)

# JSON field -> (may it be null, meaning). Every field is written; readers ignore unknown ones.
FIELDS: dict[str, tuple[bool, str]] = {
    "image_id": (False, "the sample key: stable id of the input item"),
    "identity_id": (False, "the identity the cluster stage assigned"),
    "label": (True, "the source's name for the person"),
    "source": (True, "source name in the recipe"),
    "locator": (True, "URL or path within the source"),
    "box": (False, "subject's face box x0,y0,x1,y1 (RetinaFace convention) in K.jpg's pixels"),
    "landmarks5": (False, "5 points [[x,y], ...] (eyes, nose, mouth corners) in K.jpg's pixels"),
    "landmarks68": (True, "68 points [[x,y], ...] in K.jpg's pixels, when the backend gives them"),
    "age": (True, "age in years (2 decimals)"),
    "gender": (True, "female | male"),
    "caption": (True, "the caption (the training prompt)"),
    "width": (False, "width of K.jpg"),
    "height": (False, "height of K.jpg"),
    "source_width": (False, "width of the image the manifest's coordinates refer to"),
    "source_height": (False, "height of that image"),
}
TEXT_FIELDS = ("image_id", "identity_id", "label", "source", "locator", "gender", "caption")
JPEG_MAGIC = b"\xff\xd8\xff"


class SampleError(ValueError):
    """A sample that cannot be used; the message says which member or field and what is wrong."""


@dataclass
class Sample:
    key: str
    meta: dict
    image: bytes  # K.jpg
    face: bytes  # K.face.jpg
    embedding: np.ndarray  # float32 [D]
    landmarks: np.ndarray  # float32 [68, 2] or [5, 2]

    @property
    def identity_id(self) -> str:
        return str(self.meta["identity_id"])


# ------------------------------------------------------------------ writing


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def landmarks_array(meta: dict) -> np.ndarray:
    """The landmarks.npy array a sample's JSON implies: 68 points when it has them, else 5."""
    points = meta.get("landmarks68") if meta.get("landmarks68") is not None else meta.get("landmarks5")
    return np.asarray(points, dtype=np.float32).reshape(-1, 2)


def encode(key: str, image: bytes, face: bytes, meta: dict, embedding) -> dict[str, bytes]:
    """{suffix: bytes} of one sample, in member order; ValueError naming what is wrong when the
    result would not pass ``validate``."""
    check_key(key)
    unknown = sorted(set(meta) - set(FIELDS))
    if unknown:
        raise ValueError(f"sample {key}: unknown JSON field(s) {', '.join(unknown)}; the sample's fields are portrait.sample.FIELDS")
    meta = {name: meta.get(name) for name in FIELDS}
    if embedding is None:
        raise ValueError(f"sample {key}: no identity embedding")
    members = {
        "jpg": image,
        "face.jpg": face,
        "json": json_bytes(meta),
        "embedding.npy": npy_bytes(np.asarray(embedding, dtype=np.float32)),
        "landmarks.npy": npy_bytes(landmarks_array(meta)) if meta.get("landmarks5") is not None else None,
    }
    problems = validate(key, members)
    if problems:
        raise ValueError(f"sample {key}: " + "; ".join(problems))
    return members


# ------------------------------------------------------------------ reading


def validate(key: str, members: dict[str, bytes | None], check_members: bool = True) -> list[str]:
    """Every problem that would make the trainer skip the sample (empty: it is usable).
    ``check_members=False`` leaves absent members to the caller (``datakit verify`` reports those
    as incomplete samples) and checks the content of the ones present."""
    try:
        _read(key, members, check_members)
    except SampleError as exn:
        return [str(exn)]
    return []


def parse(key: str, members: dict[str, bytes]) -> Sample:
    """The sample's content, checked; SampleError on the first problem."""
    return _read(key, members, True)


def _read(key: str, members: dict, check_members: bool) -> Sample | None:
    present = {s: d for s, d in members.items() if d is not None}
    missing = [s for s in REQUIRED_MEMBERS if s not in present]
    if missing and check_members:
        raise SampleError(f"missing member(s) {', '.join(missing)}")
    for suffix in ("jpg", "face.jpg"):
        if suffix in present and not present[suffix].startswith(JPEG_MAGIC):
            raise SampleError(f"{key}.{suffix} is not a JPEG file")
    meta = _meta(key, present["json"]) if "json" in present else None
    embedding = landmarks = None
    if "embedding.npy" in present:
        embedding = _array(present["embedding.npy"], f"{key}.embedding.npy")
        if embedding.ndim != 1 or embedding.size < 2:
            raise SampleError(f"{key}.embedding.npy must be a vector, has shape {embedding.shape}")
    if "landmarks.npy" in present:
        landmarks = _array(present["landmarks.npy"], f"{key}.landmarks.npy")
        if landmarks.shape not in ((68, 2), (5, 2)):
            raise SampleError(f"{key}.landmarks.npy must be 68x2 or 5x2, has shape {landmarks.shape}")
        if meta is not None:
            want = 68 if meta.get("landmarks68") is not None else 5
            if len(landmarks) != want:
                raise SampleError(f"{key}.landmarks.npy has {len(landmarks)} points, its JSON {want}")
    if missing:
        return None
    return Sample(key, meta, present["jpg"], present["face.jpg"], embedding, landmarks)


def _meta(key: str, data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exn:
        raise SampleError(f"{key}.json is not valid JSON ({exn})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{key}.json is not a JSON object")
    absent = [n for n, (nullable, _) in FIELDS.items() if not nullable and meta.get(n) in (None, "")]
    if absent:
        raise SampleError(f"{key}.json lacks {', '.join(absent)}")
    if meta["image_id"] != key:
        raise SampleError(f"{key}.json has image_id {meta['image_id']!r}, not its key")
    for name in TEXT_FIELDS:  # valid JSON of the wrong type once reached the trainer (a caption 5)
        if meta.get(name) is not None and not isinstance(meta[name], str):
            raise SampleError(f"{key}.json: {name} must be text or null, is {meta[name]!r}")
    age = meta.get("age")
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)):
        raise SampleError(f"{key}.json: age must be a number or null, is {age!r}")
    for name in ("width", "height", "source_width", "source_height"):
        if isinstance(meta[name], bool) or not isinstance(meta[name], int) or meta[name] < 1:
            raise SampleError(f"{key}.json: {name} must be a positive integer, is {meta[name]!r}")
    _points(key, meta, "box", (4,))
    _points(key, meta, "landmarks5", (5, 2))
    if meta.get("landmarks68") is not None:
        _points(key, meta, "landmarks68", (68, 2))
    return meta


def _points(key: str, meta: dict, name: str, shape: tuple) -> None:
    try:
        array = np.asarray(meta[name], dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is not None and array.shape == shape and any(isinstance(v, bool) for v in np.asarray(meta[name], dtype=object).ravel()):
        array = None  # true / false are not coordinates
    if array is None or array.shape != shape or not np.all(np.isfinite(array)):
        raise SampleError(f"{key}.json: {name} must be {'x'.join(map(str, shape))} finite numbers")


def _array(data: bytes, what: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:  # ValueError for pickled objects, others for garbage
        raise SampleError(f"{what} is not a readable .npy array ({exn})") from None
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise SampleError(f"{what} must hold finite floats, has {array.dtype}")
    return array.astype(np.float32)

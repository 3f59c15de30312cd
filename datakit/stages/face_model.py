"""What the face stages share: the face backend of a worker and the per-row loop.

A face stage reads the image bytes and the columns it ``NEEDS`` and adds its ``COLUMNS``; the
engine hands it the live rows only and settles the rest.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from portrait.decode import load_rgb_array
from portrait.faces import FaceSettings, load_backend, model_provenance
from portrait.faces.base import Face
from datakit.stage import Drop, Output, Stage, map_rows


def face_settings(context: dict) -> FaceSettings:
    value = context.get("faces")
    return value if isinstance(value, FaceSettings) else FaceSettings.model_validate(value or {})


def backend_from_context(context: dict, num_cpus: float | None = None):
    """The backend for one worker. Unless the recipe sets ``faces.threads``, onnxruntime gets as
    many threads as the worker's CPU share (at least one): its default, every core, would make
    the workers of a pool fight over the same cores."""
    settings = face_settings(context)
    if settings.threads is None and num_cpus is not None:
        settings = settings.model_copy(update={"threads": max(1, int(num_cpus))})
    return load_backend(settings, base_dir=context.get("recipe_dir"))


def floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def face_from_row(row: dict) -> Face:
    """The subject's face as the detect stage recorded it."""
    if row.get("face_box") is None or row.get("landmarks5") is None:
        raise ValueError(
            f"row {row['image_id']}: no face box or landmarks; the detect stage must run before this one"
        )
    lm68 = row.get("landmarks68")
    return Face(
        box=tuple(row["face_box"]),
        score=row.get("face_score") or 0.0,
        landmarks5=np.asarray(row["landmarks5"], dtype=np.float64).reshape(5, 2),
        landmarks68=None if lm68 is None else np.asarray(lm68, dtype=np.float64).reshape(68, 2),
    )


# The most decoded pixels a worker keeps for the partition at hand (see Photos).
KEPT_PIXEL_BYTES = 256 << 20


class DecodedPhotos:
    """The pixels a worker's face stages decoded for the partition they are working on.

    The engine runs a partition through detect, filter, embed and attributes one after another
    in one worker (a fused pool, ``plan.pools``), and each of them decodes the same photos the
    same way. Kept here, a photo is decoded once per worker pass instead of up to three times.
    Keyed by the bytes' SHA-256 and the decode's size, so a kept decode is the decode those
    bytes give, bit for bit (the arrays are read-only). When a stage starts a partition, the
    pixels of other partitions go; up to ``max_bytes`` are kept (a photo over the budget is
    decoded again by the next stage, as before)."""

    def __init__(self, max_bytes: int = KEPT_PIXEL_BYTES):
        self.max_bytes = max_bytes
        self.kept: dict[tuple[bytes, int], tuple] = {}
        self.used = 0

    def start(self, blobs: list, min_side: int) -> list[tuple[bytes, int] | None]:
        """The keys of a partition's photos; pixels kept for photos outside it are dropped."""
        keys = [(hashlib.sha256(data).digest(), min_side) if isinstance(data, bytes) else None for data in blobs]
        wanted = set(keys)
        for key in [k for k in self.kept if k not in wanted]:
            self.used -= self.kept.pop(key)[0].nbytes
        return keys

    def decode(self, data: bytes, key: tuple[bytes, int] | None, min_side: int) -> tuple[np.ndarray, int, int, int]:
        found = self.kept.get(key)
        if found is not None:
            return found
        decoded = load_rgb_array(data, min_side)  # a DecodeError is raised again by the next stage, not kept
        if key is not None and self.used + decoded[0].nbytes <= self.max_bytes:
            self.kept[key] = decoded
            self.used += decoded[0].nbytes
        return decoded


DECODED = DecodedPhotos()  # one per worker process, shared by its face stages


class Photos:
    """One partition's photos (their bytes, in row order) as every face stage decodes them: a
    JPEG at least twice the detection size at the reduced scale that still covers the detection
    copy (portrait/decode.py), so detect, embed and attributes see the same pixels and a large
    photo is never decoded in full for them. ``decode(i)`` gives (pixels, scale, full width,
    full height); coordinates in the manifest are the full image's: the pixels' times ``scale``.
    Decoded once per worker, through its ``DECODED`` pixels."""

    def __init__(self, blobs: list[bytes], context: dict, decoded: DecodedPhotos | None = None):
        self.blobs, self.decoded = blobs, decoded or DECODED
        self.min_side = face_settings(context).detect_max_side
        self.keys = self.decoded.start(blobs, self.min_side)

    def decode(self, i: int) -> tuple[np.ndarray, int, int, int]:
        return self.decoded.decode(self.blobs[i], self.keys[i], self.min_side)


class FaceModelStage(Stage):
    """A partition stage that runs the face backend on each row's image.

    Subclasses name the columns they read besides the image (``NEEDS``) and add (``COLUMNS``)
    and implement ``process_row(row, out)``: it fills ``out`` and returns a drop or None.
    """

    uses_model = True
    NEEDS: tuple[str, ...] = ()
    COLUMNS: tuple[str, ...] = ()

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.reads = ("image_bytes", *self.NEEDS)
        self.adds = self.COLUMNS

    @classmethod
    def provenance(cls, settings, context) -> dict:
        return model_provenance(face_settings(context), context.get("recipe_dir"))

    def setup(self) -> None:
        self.backend = backend_from_context(self.context, self.settings.num_cpus)

    def process(self, rows: pa.Table) -> Output:
        return map_rows(rows, self.adds, self.process_row)

    def process_row(self, row: dict, out: dict) -> Drop | None:
        raise NotImplementedError

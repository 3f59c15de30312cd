"""detect: find every face, its box, score and landmarks; drop images without one.

The subject is chosen by portrait/faces/subject.py (the trainer's reader takes the same face): by score and size (detections under the score
floor ``min_score`` never compete), or, when the source gives a box for the labelled person
(IMDb-Face's ``rect``), the face matching that box (``hint_min_iou``). Its box (RetinaFace
convention, may reach past the image's edge as RetinaFace's do), score, area fraction (the part
of the box inside the image over the image's area), 5 and 68 landmarks and a sharpness figure
(variance of the Laplacian on the aligned face at ``sharpness_size`` grey pixels) go into the
manifest; the other faces go into ``other_faces`` as JSON, strongest first, weak ones marked.
The filter stage decides on them; this stage drops images where the backend finds no face at
all (``no_face``) or none matching the source's box (``no_face_matches_hint``).
"""

from __future__ import annotations

import json

import pyarrow as pa
from pydantic import Field

from portrait.decode import DecodeError
from portrait.faces import geometry, subject
from datakit.stage import Drop, Output, StageSettings, map_rows
from datakit.stages.face_model import FaceModelStage, Photos, floats

COLUMNS = (
    "face_backend",
    "face_count",
    "face_box",
    "face_score",
    "face_area_fraction",
    "landmarks5",
    "landmarks68",
    "sharpness",
    "other_faces",
    "hint_iou",
)


class Settings(StageSettings):
    # the aligned face (no margin) is measured at this size (112: ArcFace's crop)
    sharpness_size: int = Field(default=112, ge=16, le=1024)
    # detections scoring under this never compete with the subject; null: the backend's floor
    min_score: float | None = None
    # a face scoring this or more counts at its full size when choosing the subject; null: per backend
    full_score: float | None = Field(default=None, gt=0)
    # with a subject hint: the least overlap (IoU) of the chosen face with the hinted box
    hint_min_iou: float = Field(default=0.3, ge=0.0, le=1.0)


class DetectStage(FaceModelStage):
    name = "detect"
    Settings = Settings
    COLUMNS = COLUMNS
    NEEDS = ("subject_hint",)

    def process(self, rows: pa.Table) -> Output:
        found = self._detect_in_batches(rows.column("image_bytes").to_pylist())
        return map_rows(rows, self.adds, lambda row, out: self.record(row, out, next(found)))

    def _detect_in_batches(self, blobs: list[bytes]):
        """Per row, in order: (decoded, faces) or the DecodeError. ``faces.batch_size`` images are
        decoded, then detected in one backend call (a batch on a batched model)."""
        size = self.backend.batch_size
        photos = Photos(blobs, self.context)
        for start in range(0, len(blobs), size):
            decoded = []
            for i in range(start, min(start + size, len(blobs))):
                try:  # download decodes first; this guards work folders made otherwise
                    decoded.append(photos.decode(i))
                except DecodeError as e:
                    decoded.append(e)
            faces = iter(self.backend.detect_many([d[0] for d in decoded if not isinstance(d, DecodeError)]))
            for d in decoded:
                yield d if isinstance(d, DecodeError) else (d, next(faces))

    def record(self, row: dict, out: dict, found) -> Drop | None:
        """Fill the row's columns from what ``_detect_in_batches`` found for it."""
        if isinstance(found, DecodeError):
            return found.reason, found.detail
        # a large JPEG is decoded at a reduced scale (face_model.Photos); faces are recorded in
        # the full image's pixels
        (pixels, scale, width, height), faces = found
        faces = [face.scaled(scale) for face in faces]
        out["face_backend"] = self.backend.name
        out["face_count"] = len(faces)
        if not faces:
            return "no_face", f"{self.backend.name} found no face in the {width}x{height} image"
        s = self.settings
        hint_box = subject.scaled_hint(row.get("subject_hint"), height, width)
        min_score, full_score = subject.SubjectSettings(s.min_score, s.full_score).thresholds(self.backend.name)
        choice = subject.choose(faces, height, width, min_score, full_score, hint_box=hint_box, hint_min_iou=s.hint_min_iou)
        image_area = float(width * height)
        out["other_faces"] = json.dumps([self._other(f, choice, height, width, image_area) for f in choice.others])
        out["hint_iou"] = choice.hint_iou
        if choice.subject is None:
            box = ", ".join(f"{v:.0f}" for v in hint_box)
            return "no_face_matches_hint", (
                f"none of the {len(faces)} faces overlaps the source's box for the labelled person ({box} in this "
                f"image) by IoU {s.hint_min_iou:g} or more; the best overlaps {choice.hint_iou:.2f}"
            )
        subject_face = choice.subject
        out["face_box"] = floats(subject_face.box)
        out["face_score"] = float(subject_face.score)
        out["face_area_fraction"] = geometry.clipped_area(subject_face.box, height, width) / image_area
        out["landmarks5"] = floats(subject_face.landmarks5)
        out["landmarks68"] = None if subject_face.landmarks68 is None else floats(subject_face.landmarks68)
        out["sharpness"] = geometry.aligned_sharpness(pixels, subject_face.landmarks5 / scale, s.sharpness_size)
        return None

    @staticmethod
    def _other(face, choice, height: int, width: int, image_area: float) -> dict:
        entry = {
            "box": [round(v, 2) for v in floats(face.box)],
            "score": round(float(face.score), 4),
            "area_fraction": round(geometry.clipped_area(face.box, height, width) / image_area, 5),
        }
        if id(face) in choice.weak:
            entry["weak"] = True  # under the score floor: recorded, never competes with the subject
        return entry

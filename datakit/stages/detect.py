"""detect: find every face, its box, score and landmarks; drop images without one.

The subject is the largest face (by its box's area inside the image). Its box (RetinaFace
convention, may reach past the image's edge as RetinaFace's do), score, area fraction (the part
of the box inside the image over the image's area), 5 and 68 landmarks and a sharpness figure
(variance of the Laplacian on its box resized to ``sharpness_size`` grey pixels) go into the
manifest; the other faces go into ``other_faces`` as JSON, largest first. The filter stage
decides on them; this stage only drops images where the backend finds no face at all.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field

from portrait.decode import DecodeError, load_rgb
from portrait.faces import geometry
from datakit.stage import Drop, StageSettings
from datakit.stages.face_model import FaceModelStage, floats

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
)


class Settings(StageSettings):
    sharpness_size: int = Field(default=128, ge=16, le=1024)


class DetectStage(FaceModelStage):
    name = "detect"
    Settings = Settings
    COLUMNS = COLUMNS

    def process_row(self, row: dict, out: dict) -> Drop | None:
        try:
            pixels = np.array(load_rgb(row["image_bytes"]), dtype=np.uint8)
        except DecodeError as e:  # download decodes first; this guards work folders made otherwise
            return e.reason, e.detail
        height, width = pixels.shape[:2]
        faces = self.backend.detect(pixels)
        faces = geometry.subject_first(faces, height, width)
        out["face_backend"] = self.backend.name
        out["face_count"] = len(faces)
        if not faces:
            return "no_face", f"{self.backend.name} found no face in the {width}x{height} image"
        image_area = float(width * height)
        subject, others = faces[0], faces[1:]
        out["face_box"] = floats(subject.box)
        out["face_score"] = float(subject.score)
        out["face_area_fraction"] = geometry.clipped_area(subject.box, height, width) / image_area
        out["landmarks5"] = floats(subject.landmarks5)
        out["landmarks68"] = None if subject.landmarks68 is None else floats(subject.landmarks68)
        out["sharpness"] = geometry.sharpness(pixels, subject.box, self.settings.sharpness_size)
        out["other_faces"] = json.dumps(
            [
                {
                    "box": [round(v, 2) for v in floats(f.box)],
                    "score": round(float(f.score), 4),
                    "area_fraction": round(geometry.clipped_area(f.box, height, width) / image_area, 5),
                }
                for f in others
            ]
        )
        return None

"""embed: the identity embedding of each kept image's subject, and its aligned face crop.

The backend aligns the subject's face from the landmarks the detect stage recorded, computes
the L2-normalised embedding (dlib: 128-d ResNet; insightface: 512-d ArcFace) and returns an
aligned crop of ``crop_size`` pixels with ``crop_padding`` margin. The crop is the face refiner's
input: it goes into the bulk column ``face_crop`` as JPEG (quality ``jpeg_quality``) and on to
the shards, never into images.parquet.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydantic import Field

from datakit.decode import load_rgb
from datakit.stage import Drop, StageSettings
from datakit.stages.face_model import FaceModelStage, face_from_row, floats

COLUMNS = ("embedding", "embedding_model", "face_crop")
NEEDS = ("face_backend", "face_box", "face_score", "landmarks5", "landmarks68")


class Settings(StageSettings):
    crop_size: int = Field(default=256, ge=64, le=1024)
    crop_padding: float = Field(default=0.25, ge=0.0, le=1.0)
    jpeg_quality: int = Field(default=95, ge=50, le=100)


class EmbedStage(FaceModelStage):
    name = "embed"
    Settings = Settings
    NEEDS = NEEDS
    COLUMNS = COLUMNS

    def process_row(self, row: dict, out: dict) -> Drop | None:
        if row["face_backend"] != self.backend.name:
            raise ValueError(
                f"row {row['image_id']}: its face was detected by {row['face_backend']!r} but the "
                f"embed stage runs {self.backend.name!r}; one build uses one face backend"
            )
        face = face_from_row(row)
        pixels = np.array(load_rgb(row["image_bytes"]), dtype=np.uint8)
        s = self.settings
        vector, crop = self.backend.embed(pixels, face, crop_size=s.crop_size, crop_padding=s.crop_padding)
        out["embedding"] = floats(vector)
        out["embedding_model"] = self.backend.embedding_model
        out["face_crop"] = jpeg(crop, s.jpeg_quality)


def jpeg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()

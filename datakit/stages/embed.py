"""embed: the identity embedding of each kept image's subject, and its aligned face crop.

The backend aligns the subject's face from the landmarks the detect stage recorded (the trainer's
inference does the same through ``portrait.faces.reader``), computes
the L2-normalised embedding (dlib: 128-d ResNet; insightface: 512-d ArcFace) and returns an
aligned crop of ``crop_size`` pixels with ``crop_padding`` margin. The crop is the face refiner's
input: it goes into the bulk column ``face_crop`` as JPEG (quality ``jpeg_quality``) and on to
the shards, never into images.parquet.

It decodes the image as the detect stage did (a large JPEG at the reduced scale that still covers
the detection copy, ``portrait/decode.py``) and works on the face at that scale, so the detect and
embed stages see the same pixels; a face that clears the filter's 10% rule is still well over the
aligned crop's face size there.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from datakit.stage import Drop, Output, StageSettings, map_rows
from datakit.stages.face_model import FaceModelStage, Photos, face_from_row, floats
from portrait.faces.reader import CropSettings, embed_faces

CROP = CropSettings()

COLUMNS = ("embedding", "embedding_model", "face_crop")
NEEDS = ("face_backend", "face_box", "face_score", "landmarks5", "landmarks68")


class Settings(StageSettings):
    crop_size: int = Field(default=CROP.size, ge=64, le=1024)  # side of the aligned face crop, pixels
    crop_padding: float = Field(default=CROP.padding, ge=0.0, le=1.0)  # margin around the aligned face, a share of its side
    jpeg_quality: int = Field(default=CROP.jpeg_quality, ge=50, le=100)  # JPEG quality of the stored face crop


class EmbedStage(FaceModelStage):
    name = "embed"
    Settings = Settings
    NEEDS = NEEDS
    COLUMNS = COLUMNS

    def process(self, rows: pa.Table) -> Output:
        found = self._embed_in_batches(rows.to_pylist())
        return map_rows(rows, self.adds, lambda row, out: self.record(out, next(found)))

    def _embed_in_batches(self, rows: list[dict]):
        """Per row, in order: (embedding, crop JPEG); ``faces.batch_size`` faces per backend call."""
        s = self.settings
        crop = CropSettings(s.crop_size, s.crop_padding, s.jpeg_quality)
        size = self.backend.batch_size
        photos = Photos([row["image_bytes"] for row in rows], self.context)
        for start in range(0, len(rows), size):
            faces = [self._face(rows[i], photos.decode(i)) for i in range(start, min(start + size, len(rows)))]
            yield from embed_faces(self.backend, faces, crop)

    def _face(self, row: dict, decoded):
        """The row's pixels (decoded as detect decoded them) and its subject's face in them."""
        if row["face_backend"] != self.backend.name:
            raise ValueError(
                f"row {row['image_id']}: its face was detected by {row['face_backend']!r} but the "
                f"embed stage runs {self.backend.name!r}; one build uses one face backend"
            )
        pixels, scale, _, _ = decoded
        return pixels, face_from_row(row).scaled(1 / scale)

    def record(self, out: dict, found) -> Drop | None:
        vector, out["face_crop"] = found
        out["embedding"] = floats(vector)
        out["embedding_model"] = self.backend.embedding_model
        return None

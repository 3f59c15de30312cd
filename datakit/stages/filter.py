"""filter: keep images whose subject's face is large, alone (or dominant) and sharp.

Reads the detect stage's columns only (no pixels). Checks run in this order and the first that
fails names the drop:

1. ``face_too_small_area``: the subject's box (RetinaFace convention, the part inside the image)
   covers under ``min_area_fraction`` of the image (HiFi-Portrait's 10% rule);
2. ``multiple_faces``: another face is comparable: the subject's area is under
   ``dominance_ratio`` times the next largest face's. When the subject dominates, the image is
   kept and the other faces stay recorded in ``other_faces``;
3. ``face_too_small_px``: the box's shorter side is under ``min_face_px`` pixels;
4. ``face_blurry``: the detect stage's sharpness figure is under ``min_sharpness``.

Other faces marked ``weak`` (under detect's score floor) are ignored by check 2, and check 2 is
skipped for a subject the source pointed at (a subject hint such as IMDb-Face's ``rect``).

Defaults were set on the 293 dev photos of the face fixtures: every dev subject covers >= 12% of
its image (RetinaFace convention) and its box is >= 52 px on the shorter side. Sharpness is
measured on the inner face of the aligned crop at 112 px (portrait/faces/geometry.py). Dev
subjects: 1st percentile 42, the tight 112 px aligned crops at least 33, only two LFW frames of
Laura Bush under 25 (9 and 10, visibly soft); the same photos blurred with a Gaussian of
sigma = 3/128 of the face box's side score median 11, 95th percentile 21, 99th 29: the default
of 25 drops 97% of those and keeps every aligned crop with a margin of 30%. Raise it for
cleaner crops.
"""

from __future__ import annotations

import json

import pyarrow as pa
from pydantic import Field

from datakit.stage import Drop, Output, Stage, StageSettings, map_rows

NEEDS = ("face_count", "face_box", "face_area_fraction", "sharpness", "other_faces", "hint_iou")


class Settings(StageSettings):
    min_area_fraction: float = Field(default=0.10, ge=0.0, le=1.0)  # the paper's rule: face box area / image area (RetinaFace box)
    dominance_ratio: float = Field(default=2.0, ge=1.0)  # with several faces, the subject's box area must be this many times the next largest's
    min_face_px: float = Field(default=40.0, ge=0.0)  # shorter side of the face box, in pixels
    min_sharpness: float = Field(default=25.0, ge=0.0)  # variance of the Laplacian of the aligned face crop


class FilterStage(Stage):
    name = "filter"
    Settings = Settings

    reads = NEEDS

    def process(self, rows: pa.Table) -> Output:
        return map_rows(rows, (), self.check)

    def check(self, row: dict, out: dict) -> Drop | None:
        s = self.settings
        if row["face_box"] is None or row["face_area_fraction"] is None:
            raise ValueError(f"row {row['image_id']}: no face columns; the detect stage must run before filter")
        area = row["face_area_fraction"]
        if area < s.min_area_fraction:
            return "face_too_small_area", f"the face box covers {area:.1%} of the image; the minimum is {s.min_area_fraction:.1%}"
        # detections under detect's score floor are recorded but never compete with the subject
        others = [o for o in json.loads(row["other_faces"] or "[]") if not o.get("weak")]
        # a subject the source pointed at (IMDb-Face's rect) needs no dominance over the others
        if others and row.get("hint_iou") is None:
            next_area = max(o["area_fraction"] for o in others)
            if area < s.dominance_ratio * next_area:
                return "multiple_faces", (
                    f"{len(others) + 1} faces; the largest covers {area:.1%} of the image and the next "
                    f"{next_area:.1%}, so none is {s.dominance_ratio:g}x larger than the rest"
                )
        x0, y0, x1, y1 = row["face_box"]
        side = min(x1 - x0, y1 - y0)
        if side < s.min_face_px:
            return "face_too_small_px", f"the face box is {side:.0f} px on its shorter side; the minimum is {s.min_face_px:g}"
        if row["sharpness"] is not None and row["sharpness"] < s.min_sharpness:
            return "face_blurry", f"face sharpness {row['sharpness']:.1f} is under the minimum {s.min_sharpness:g}"
        return None

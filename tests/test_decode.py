"""The reduced-scale decode (portrait/decode.py): a JPEG at least twice the size a stage needs is
decoded at 1/2, 1/4 or 1/8 scale, and the face stages record the full image's coordinates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from portrait.decode import decode_image

DEV = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "faces" / "dev"


def _jpeg(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92, **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(sorted(DEV.glob("*/*.jpg"))[0]).convert("RGB")


def test_a_large_jpeg_is_decoded_at_the_scale_a_stage_needs(photo):
    big = photo.resize((2000, 1500), Image.BILINEAR)
    data = _jpeg(big)
    full = decode_image(data)
    reduced = decode_image(data, min_side=640)
    assert (full.scale, full.image.size) == (1, (2000, 1500))
    assert (reduced.scale, reduced.image.size, reduced.width, reduced.height) == (2, (1000, 750), 2000, 1500)
    assert decode_image(data, min_side=400).scale == 4 and decode_image(data, min_side=1001).scale == 1
    halved = np.asarray(full.image.resize((1000, 750), Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(reduced.image, dtype=np.float64) - halved).mean() < 3  # the same picture
    assert decode_image(_jpeg(photo.resize((1200, 900))), min_side=640).scale == 1  # under twice: in full
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees: the full size is reported after orientation
    turned = decode_image(_jpeg(big, exif=exif.tobytes()), min_side=640)
    assert (turned.scale, turned.image.size, turned.width, turned.height) == (2, (750, 1000), 1500, 2000)


def test_the_detect_stage_records_full_image_coordinates_from_a_reduced_decode(photo):
    from face_pipeline import run_stages

    small = photo.resize((480, round(480 * photo.height / photo.width)), Image.BICUBIC)
    k = 4  # the large one is decoded at 1/2 (960 px) for its 640 px detection copy
    blobs = [_jpeg(small), _jpeg(photo.resize((small.width * k, small.height * k), Image.BICUBIC))]
    table = pa.table({
        "image_id": ["small", "large"], "status": ["kept"] * 2, "drop_stage": [None] * 2,
        "reason": [None] * 2, "detail": [None] * 2, "image_bytes": blobs,
    })  # fmt: skip
    small, large = run_stages(table, stages=("detect",)).to_pylist()
    assert large["face_count"] >= 1, large["detail"]
    expected = np.asarray(small["face_box"]) * k
    assert np.abs(np.asarray(large["face_box"]) - expected).max() < 0.08 * (expected[2] - expected[0])
    assert abs(large["face_area_fraction"] - small["face_area_fraction"]) < 0.03
    assert np.abs(np.asarray(large["landmarks5"]) - np.asarray(small["landmarks5"]) * k).max() < 0.08 * (expected[2] - expected[0])

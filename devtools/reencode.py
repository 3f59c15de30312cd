"""The same photo the way the web serves it: re-encoded variants for quality tests and benchmarks.

Each variant is the bytes a crawler would fetch: grayscale JPEG, CMYK JPEG, JPEG at quality 40,
a JPEG whose pixels are stored rotated with an EXIF orientation that undoes it, and the face
alone downscaled to a 112 px crop (as aligned-crop datasets ship faces). Re-encoding moves a
dlib embedding by up to ~0.2, which is what identity cleaning must tolerate.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

VARIANTS = ("gray", "cmyk", "q40", "exif_rotated", "crop112")


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def reencode(rgb: np.ndarray, variant: str, face_box=None) -> bytes:
    """Bytes of ``rgb`` (HxWx3 uint8) re-encoded as ``variant``; ``crop112`` needs the face box
    (x0, y0, x1, y1) and crops it square with a fifth of margin before shrinking to 112 px."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if variant == "gray":
        return _jpeg(img.convert("L"), quality=90)
    if variant == "cmyk":
        return _jpeg(img.convert("CMYK"), quality=90)
    if variant == "q40":
        return _jpeg(img, quality=40)
    if variant == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are turned the other way
        return _jpeg(img.transpose(Image.Transpose.ROTATE_90), quality=90, exif=exif)
    if variant == "crop112":
        if face_box is None:
            raise ValueError("crop112 needs the face box")
        x0, y0, x1, y1 = (float(v) for v in face_box)
        side = max(x1 - x0, y1 - y0) * 1.2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        return _jpeg(img.crop(box).resize((112, 112), Image.Resampling.LANCZOS), quality=90)
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")

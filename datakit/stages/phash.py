"""phash: the perceptual hashes dedup compares, one partition at a time (it needs the pixels).

A 64-bit perceptual hash (imagehash's phash) of the image and of its mirror image, so the global
dedup step finds horizontally flipped copies from these two narrow columns alone. The image is
decoded at a reduced scale (Pillow's draft mode for JPEG: 3x faster, and every copy is hashed
the same way). An image that no longer decodes only loses the near-duplicate check.
"""

from __future__ import annotations

import io
import logging

import imagehash
import pyarrow as pa
from PIL import Image, ImageOps

from datakit.stage import Output, Stage

log = logging.getLogger(__name__)

PHASH_INPUT = 32  # imagehash.phash's default: 32x32 grayscale, DCT, top-left 8x8


def phash_pair(data: bytes) -> tuple[str, str]:
    """(phash of the image, phash of its mirror image) as 16-hex-digit strings."""
    img = Image.open(io.BytesIO(data))
    img.draft("L", (4 * PHASH_INPUT, 4 * PHASH_INPUT))  # JPEG only: decode at a reduced scale
    img = ImageOps.exif_transpose(img)
    small = img.convert("L").resize((PHASH_INPUT, PHASH_INPUT), Image.Resampling.LANCZOS)
    mirror = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return str(imagehash.phash(small)), str(imagehash.phash(mirror))


class PhashStage(Stage):
    name = "phash"
    kind = "partition"
    step_of = "dedup"
    reads = ("image_bytes",)
    adds = ("phash", "phash_mirror")

    def process(self, rows: pa.Table) -> Output:
        hashes, mirrors = [], []
        for image_id, data in zip(rows.column("image_id").to_pylist(), rows.column("image_bytes").to_pylist()):
            h = m = None
            if data:
                try:
                    h, m = phash_pair(data)
                except Exception as e:  # these bytes passed decode once; a failure only costs the near check
                    log.warning("phash: no hash for %s: %s: %s", image_id, type(e).__name__, e)
            hashes.append(h)
            mirrors.append(m)
        return Output({"phash": hashes, "phash_mirror": mirrors})

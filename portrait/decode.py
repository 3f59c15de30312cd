"""Decode image bytes safely: the one place that turns bytes into RGB pixels, for every stage
and for the trainer's inference (so a photo has the same pixels there as in the build).

Checks, in order: the header's pixel count against a limit before any pixel is decoded
(decompression bombs), a full decode (truncated files fail here, not later), EXIF orientation,
then conversion of CMYK, palette, grayscale and alpha images to RGB (alpha over white).

``decode_image`` returns the RGB pixels. ``check_image`` runs the same checks and returns only
what they learn (format, mode, size after orientation), for about half the cost: a JPEG is
decoded at 1/8 scale. libjpeg still reads and entropy-decodes every byte of the file at that
scale (only the inverse DCT is smaller), so truncated or corrupt files fail exactly as in a full
decode; orientation and RGB conversion run on the small image, so they fail alike too. The
download stage uses it because it keeps the original bytes and throws the pixels away;
``tests/test_download.py`` checks that both give the same verdict on every fixture file.

Decode once at the size a stage needs: ``decode_image(data, min_side=N)`` decodes a JPEG whose
longer side is at least twice ``N`` at a reduced scale (1/2, 1/4 or 1/8: libjpeg's DCT scaling,
Pillow's ``draft``), the smallest whose longer side is still at least ``N``; ``Decoded.scale``
says which, ``width``/``height`` stay the image's full size. A 3000x2000 photo then costs ~12 ms
instead of ~50 ms to decode for detection (``make bench-faces`` prints the figures). Images
under twice ``N`` (every demo photo that is kept) and other formats decode in full as before,
so their results do not change. The checks are the same: every byte is still entropy-decoded.
The trainer's inference decodes a photo for its face the same way (``FaceReader.load_photo``,
through ``trainer.infer.open_photo``), and so does the evaluation (``trainer.scoring.score``) for
references, driving photos and outputs, so a large photo's face reads there as in the build.

Both are thread-safe: they change no global state (no warnings filters), so the download stage
decodes in several threads at once.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


class DecodeError(Exception):
    """The bytes are not a usable image. ``reason`` is a code from datakit.schema.REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied; 1/scale of the full size
    format: str
    mode: str  # mode before conversion
    width: int  # the full image's, after EXIF orientation
    height: int
    scale: int = 1  # the full image's coordinates are the decoded image's times this


@dataclass
class ImageInfo:
    """What check_image learns: the same fields as Decoded, without the pixels."""

    format: str
    mode: str  # mode before conversion
    width: int  # after EXIF orientation
    height: int


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Decoded:
    """Decode ``data`` (fully, or at a reduced scale with ``min_side``: see the module docstring);
    raise DecodeError (too_many_pixels | undecodable) with plain-words detail that holds no
    addresses or timings (the same bytes give the same text)."""
    img, fmt, mode, (width, height) = _open_and_load(data, max_pixels, reduced=False, min_side=min_side)
    scale = max(1, round(width / img.width))
    orientation = _orientation(img) if scale > 1 else None
    rgb = _orient_and_convert(img)
    if scale == 1:
        width, height = rgb.width, rgb.height
    elif orientation in SWAPS_SIDES:
        width, height = height, width
    return Decoded(image=rgb, format=fmt, mode=mode, width=width, height=height, scale=scale)


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """decode_image's verdict and fields, cheaper (see the module docstring); no pixels."""
    img, fmt, mode, (width, height) = _open_and_load(data, max_pixels, reduced=True)
    orientation = _orientation(img)
    _orient_and_convert(img).close()
    if orientation in SWAPS_SIDES:
        width, height = height, width
    return ImageInfo(format=fmt, mode=mode, width=width, height=height)


def _open_and_load(
    data: bytes, max_pixels: int, reduced: bool, min_side: int | None = None
) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """Open, check the declared size, decode. Returns the image, format, mode and the size the
    header declares (the image itself is smaller when ``reduced`` or ``min_side`` applied to a JPEG)."""
    if not data:
        raise DecodeError("undecodable", "empty body")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or "unknown"
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError("too_many_pixels", f"{fmt} header declares {w}x{h} = {w * h} pixels, "
                                                 f"over max_pixels {max_pixels}")
        mode = img.mode
        if reduced and isinstance(img, JpegImagePlugin.JpegImageFile):
            img.draft(mode, (1, 1))  # smallest scale libjpeg offers (1/8); same mode
        elif min_side and isinstance(img, JpegImagePlugin.JpegImageFile):
            scale = reduction(w, h, min_side)
            if scale > 1:  # draft picks the largest of 1/2, 1/4, 1/8 that keeps w//scale x h//scale
                img.draft(mode, (w // scale, h // scale))
        img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own hard limit, hit inside Image.open
        declared = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{declared.group(1)} pixels" if declared else "more pixels than Pillow allows"
        raise DecodeError("too_many_pixels", f"header declares {count}, over max_pixels {max_pixels}") from e
    except UnidentifiedImageError as e:
        raise DecodeError("undecodable", f"not an image format Pillow knows (starts with {data[:16]!r})") from e
    except Exception as e:  # Pillow raises many types for bad bytes; all mean the same here
        raise DecodeError("undecodable", f"{type(e).__name__}: {e}") from e
    return img, fmt, mode, (w, h)


def image_header_size(data: bytes) -> tuple[int, int]:
    """(width, height) the header declares, before EXIF orientation; nothing decoded."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def reduction(width: int, height: int, min_side: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps the longer side at least ``min_side``."""
    longer = max(width, height)
    return next(s for s in (8, 4, 2, 1) if s == 1 or longer // s >= min_side)


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION)
    except Exception as e:
        raise DecodeError("undecodable", f"EXIF cannot be read: {type(e).__name__}: {e}") from e


def _orient_and_convert(img: Image.Image) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise DecodeError("undecodable", f"EXIF orientation failed: {type(e).__name__}: {e}") from e
    try:
        return to_rgb(img)
    except Exception as e:  # an exotic mode Pillow cannot convert
        raise DecodeError("undecodable", f"cannot convert mode {img.mode} to RGB: {type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clip
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The RGB image of bytes that the download stage already accepted."""
    return decode_image(data, max_pixels).image


def load_rgb_array(data: bytes, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(HxWx3 uint8 pixels, scale, full width, full height): the face stages' decode, reduced
    with ``min_side`` as ``decode_image`` does."""
    decoded = decode_image(data, max_pixels, min_side)
    return np.asarray(decoded.image, dtype=np.uint8), decoded.scale, decoded.width, decoded.height

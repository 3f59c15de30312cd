"""Decode image bytes safely: one place that every stage uses to turn bytes into RGB pixels.

Checks, in order: the header's pixel count against a limit before any pixel is decoded
(decompression bombs), a full decode (truncated files fail here, not later), EXIF orientation,
then conversion of CMYK, palette, grayscale and alpha images to RGB (alpha over white).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000


class DecodeError(Exception):
    """The bytes are not a usable image. ``reason`` is a code from datakit.schema.REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str
    mode: str  # mode before conversion
    width: int
    height: int


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data`` fully; raise DecodeError (too_many_pixels | undecodable) with plain-words
    detail that holds no addresses or timings (the same bytes give the same text).

    Thread-safe: it changes no global state (no warnings filters), so the download stage can
    decode in several threads at once."""
    if not data:
        raise DecodeError("undecodable", "empty body")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or "unknown"
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError("too_many_pixels", f"{fmt} header declares {w}x{h} = {w * h} pixels, "
                                                 f"over max_pixels {max_pixels}")
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
    mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise DecodeError("undecodable", f"EXIF orientation failed: {type(e).__name__}: {e}") from e
    return Decoded(image=to_rgb(img), format=fmt, mode=mode, width=img.width, height=img.height)


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

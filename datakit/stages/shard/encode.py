"""shard_encode: each kept image's WebDataset sample, encoded once (see datakit/stages/shard)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from datakit.stage import Output, Stage
from datakit.stages.shard import ENCODE_STEP, MEMBERS
from portrait import sample, shardio
from portrait.decode import decode_image, image_header_size
from portrait.ids import check_key

READS = (
    "source", "label", "locator", "identity_id", "face_box", "landmarks5", "landmarks68", "embedding",
    "age", "gender", "caption", "width", "height", "image_bytes", "face_crop",
)  # fmt: skip


class ShardEncodeStage(Stage):
    name = ENCODE_STEP
    kind = "partition"
    step_of = "shard"
    reads = READS
    adds = (*(col for _, col in MEMBERS), "tar_bytes")
    work_types = {**{col: pa.binary() for _, col in MEMBERS}, "tar_bytes": pa.int64()}

    def process(self, rows: pa.Table) -> Output:
        s = self.settings
        out = Output({c: [None] * rows.num_rows for c in self.adds})
        for i, row in enumerate(rows.to_pylist()):
            encoded = encode_sample(row, s.image_size, s.jpeg_quality, s.resize)
            if encoded.get("error"):
                out.drops[i] = ("stage_error", encoded["error"])
                continue
            for _, col in MEMBERS:
                out.values[col][i] = encoded.get(col)
            out.values["tar_bytes"][i] = tar_bytes(encoded)
        return out


def tar_bytes(encoded: dict) -> int:
    """Bytes a sample takes in a tar (shardio.member_tar_bytes summed over its members)."""
    return sum(int(shardio.member_tar_bytes(len(encoded[col]))) for _, col in MEMBERS if encoded.get(col) is not None)


def stored_scale(width: int, height: int, image_size: int, resize: str = "long_side") -> float:
    """The factor an image is stored at: its long (or short) side brought down to image_size; never up."""
    side = max(width, height) if resize == "long_side" else min(width, height)
    return min(1.0, image_size / side)


def stored_min_side(data: bytes, image_size: int, resize: str) -> int:
    """The longer side a reduced decode must keep for the stored image (decode_image's
    ``min_side``): image_size, or with ``short_side`` image_size times the aspect ratio. A JPEG
    at least twice that is decoded at 1/2, 1/4 or 1/8 scale instead of in full."""
    if resize == "long_side":
        return image_size
    width, height = image_header_size(data)
    return -(-image_size * max(width, height) // max(1, min(width, height)))


def encode_sample(row: dict, image_size: int, quality: int, resize: str = "long_side") -> dict:
    key = row["image_id"]
    out = {"key": key, "identity_id": row["identity_id"], "error": None}
    try:
        check_key(key)
        if not row.get("face_crop"):
            raise ValueError("no aligned face crop in the work folder")
        if not row.get("image_bytes"):
            raise ValueError("no image bytes in the work folder")
        decoded = decode_image(row["image_bytes"], min_side=stored_min_side(row["image_bytes"], image_size, resize))
        image, w, h = decoded.image, decoded.width, decoded.height
        scale = stored_scale(w, h, image_size, resize)
        if scale < 1.0:  # from the full size, or the reduced decode's; the same stored size
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # 3 = bicubic
        sx, sy = image.width / w, image.height / h
        box = _scaled(row.get("face_box"), sx, sy)
        lm5, lm68 = _scaled(row.get("landmarks5"), sx, sy), _scaled(row.get("landmarks68"), sx, sy)
        meta = {
            "image_id": key,
            "identity_id": row["identity_id"],
            "label": row.get("label"),
            "source": row.get("source"),
            "locator": row.get("locator"),
            "box": box,
            "landmarks5": _pairs(lm5),
            "landmarks68": _pairs(lm68),
            "age": None if row.get("age") is None else round(float(row["age"]), 2),
            "gender": row.get("gender"),
            "caption": row.get("caption"),
            "width": image.width,
            "height": image.height,
            "source_width": w,
            "source_height": h,
        }
        members = sample.encode(key, jpeg_bytes(image, quality), bytes(row["face_crop"]), meta, row.get("embedding"))
        out.update({column: members[suffix] for suffix, column in MEMBERS})
    except Exception as e:  # one bad sample never stops the shards; it is dropped with the reason
        out = {"key": key, "identity_id": row["identity_id"], "error": f"shard: {type(e).__name__}: {e}"}
    return out


def _scaled(values, sx: float, sy: float):
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 2) * np.array([sx, sy])
    return [round(float(v), 2) for v in arr.ravel()]


def _pairs(flat):
    return None if flat is None else [flat[i : i + 2] for i in range(0, len(flat), 2)]


def jpeg_bytes(image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings (no EXIF, no ICC, baseline, 4:2:0) so bytes depend on pixels only.
    image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue()

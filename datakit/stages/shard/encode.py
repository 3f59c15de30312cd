"""shard_encode: each kept image's WebDataset sample, encoded once (see datakit/stages/shard)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa

from datakit.decode import load_rgb
from datakit.stage import Output, Stage
from datakit.stages.shard import BLOCK, ENCODE_STEP, MEMBERS

SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
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
            sample = encode_sample(row, s.image_size, s.jpeg_quality)
            if sample.get("error"):
                out.drops[i] = ("stage_error", sample["error"])
                continue
            for _, col in MEMBERS:
                out.values[col][i] = sample.get(col)
            out.values["tar_bytes"][i] = tar_bytes(sample)
        return out


def tar_bytes(sample: dict) -> int:
    """Bytes a sample takes in a tar: a header block per member plus its content in blocks."""
    return sum(BLOCK + -(-len(sample[col]) // BLOCK) * BLOCK for _, col in MEMBERS if sample.get(col) is not None)


def encode_sample(row: dict, image_size: int, quality: int) -> dict:
    key = row["image_id"]
    out = {"key": key, "identity_id": row["identity_id"], "error": None}
    try:
        if not SAFE_KEY.match(key or ""):
            raise ValueError(f"key {key!r} is not a plain word of [0-9A-Za-z_-]; it cannot name tar members")
        if not row.get("face_crop"):
            raise ValueError("no aligned face crop in the work folder")
        if not row.get("image_bytes"):
            raise ValueError("no image bytes in the work folder")
        image = load_rgb(row["image_bytes"])
        w, h = image.size
        scale = min(1.0, image_size / max(w, h))
        if scale < 1.0:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # 3 = bicubic
        sx, sy = image.width / w, image.height / h
        out["jpg"] = jpeg_bytes(image, quality)
        out["face_jpg"] = bytes(row["face_crop"])
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
        out["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        if row.get("embedding") is not None:
            out["embedding_npy"] = npy_bytes(np.asarray(row["embedding"], dtype=np.float32))
        landmarks = lm68 if lm68 is not None else lm5
        if landmarks is not None:
            out["landmarks_npy"] = npy_bytes(np.asarray(landmarks, dtype=np.float32).reshape(-1, 2))
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


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()



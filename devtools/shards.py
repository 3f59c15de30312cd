"""Shards for tests and benchmarks, written by the real sample encoder and tar writer.

``synthetic_samples`` draws faces (template landmarks, per-identity colours and embedding
directions; no model needed) and encodes each with ``portrait.sample.encode``, the shard
stage's encoder; ``write_shards`` packs identities into ``shard-NNNNN.tar`` files with
``portrait.shardio``, the shard stage's tar writer, never splitting one. The trainer's tests
therefore read the format the build writes, not a copy of it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from portrait import sample, shardio
from portrait.faces.geometry import five_from_68
from portrait.ids import image_id


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def template_landmarks() -> np.ndarray:
    """A frontal 68-point face in a unit square (x right, y down), iBUG order."""
    pts = []
    for a in np.linspace(np.pi * 0.95, np.pi * 0.05, 17):  # jaw, from the image-left ear to the right one
        pts.append((0.5 - 0.45 * np.cos(a), 0.35 + 0.6 * np.sin(a)))
    for x0 in (0.15, 0.57):  # brows
        pts += [(x0 + 0.07 * i, 0.3 - 0.03 * np.sin(np.pi * i / 4)) for i in range(5)]
    pts += [(0.5, 0.38 + 0.06 * i) for i in range(4)]  # nose bridge
    pts += [(0.4 + 0.05 * i, 0.6 + 0.02 * (1 - abs(i - 2) / 2)) for i in range(5)]  # nose lower
    for cx in (0.3, 0.7):  # eyes
        pts += [(cx + 0.08 * np.cos(a), 0.4 + 0.03 * np.sin(a)) for a in np.linspace(np.pi, 3 * np.pi, 7)[:-1]]
    pts += [(0.5 + 0.17 * np.cos(a), 0.78 + 0.07 * np.sin(a)) for a in np.linspace(np.pi, 3 * np.pi, 13)[:-1]]  # outer lip
    pts += [(0.5 + 0.1 * np.cos(a), 0.78 + 0.025 * np.sin(a)) for a in np.linspace(np.pi, 3 * np.pi, 9)[:-1]]  # inner lip
    return np.array(pts, dtype=np.float32)


def _pairs(points: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(points, dtype=np.float64)]


def encode(key: str, identity: str, label: str, source: str, locator: str, image: Image.Image, face: Image.Image,
           box, landmarks68: np.ndarray, embedding: np.ndarray, caption: str) -> dict:
    """One sample as WebDataset yields it (``__key__`` and a member per suffix)."""
    meta = {
        "image_id": key,
        "identity_id": identity,
        "label": label,
        "source": source,
        "locator": locator,
        "box": [round(float(v), 2) for v in box],
        "landmarks5": _pairs(five_from_68(landmarks68)),
        "landmarks68": _pairs(landmarks68),
        "caption": caption,
        "width": image.width,
        "height": image.height,
        "source_width": image.width,
        "source_height": image.height,
    }
    return {"__key__": key, **sample.encode(key, jpeg(image), jpeg(face), meta, embedding)}


def synthetic_samples(identities: int, per_identity: int, seed: int = 0, dim: int = 128, size: int = 96) -> dict:
    """{identity_id: [sample, ...]} of drawn faces: each identity has its own colours, face
    proportions and embedding direction; photos differ by position, scale and noise."""
    rng = np.random.default_rng(seed)
    out = {}
    template = template_landmarks()
    for i in range(identities):
        identity = f"synthetic-{i:03d}"
        centre = rng.normal(size=dim)
        skin = tuple(int(v) for v in rng.integers(80, 240, 3))
        stretch = np.array([1.0, rng.uniform(0.85, 1.15)], dtype=np.float32)
        samples = []
        for j in range(per_identity):
            locator = f"{identity}/{j:04d}.jpg"
            key = image_id("synthetic", locator)
            width, height = int(size * rng.uniform(1.0, 1.4)), size
            side = rng.uniform(0.45, 0.7) * height
            x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side * stretch[1])
            landmarks = template * side * stretch + np.array([x0, y0], dtype=np.float32)
            image = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            x_min, y_min = landmarks.min(0)
            x_max, y_max = landmarks.max(0)
            draw.ellipse([x_min, y_min - 0.2 * side, x_max, y_max], fill=skin)
            for first, last in ((36, 42), (42, 48), (48, 60)):
                draw.polygon([tuple(p) for p in landmarks[first:last]], fill=(30, 20, 20))
            box = (x_min, y_min - 0.2 * side, x_max, y_max)
            face = image.crop(tuple(int(v) for v in box)).resize((64, 64))
            embedding = centre + 0.3 * rng.normal(size=dim)
            embedding /= np.linalg.norm(embedding)
            caption = f"a photo of person {i}, number {j}"
            samples.append(encode(key, identity, identity, "synthetic", locator, image, face, box, landmarks, embedding, caption))
        out[identity] = samples
    return out


def write_shards(folder: Path, samples_by_identity: dict, identities_per_shard: int) -> list[Path]:
    """Pack identities in order, ``identities_per_shard`` per shard, with the shard stage's writer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identities = list(samples_by_identity)
    paths = []
    for index, start in enumerate(range(0, len(identities), identities_per_shard)):
        path = folder / f"shard-{index:05d}.tar"
        group = [s for identity in identities[start : start + identities_per_shard] for s in samples_by_identity[identity]]
        shardio.write_tar(path, ((s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in group))
        paths.append(path)
    return paths

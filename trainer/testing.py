"""Small shards in the shard stage's format, for tests and benchmarks when demo shards are absent.

Two sources of samples: real photos analysed with dlib (``photo_samples``: real boxes,
68 landmarks, 128-d embeddings, aligned chips, as the dlib backend of datakit gives them) and
generated images (``synthetic_samples``: a drawn face with template landmarks and random unit
embeddings; no model needed). ``write_shards`` packs identities into ``shard-NNNNN.tar`` files,
never splitting one, with WebDataset's TarWriter.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def image_id(source: str, locator: str) -> str:
    return hashlib.sha1(f"{source}\0{locator}".encode()).hexdigest()[:16]


def make_sample(key, identity, label, source, locator, image, face, box, landmarks, embedding, caption) -> dict:
    meta = {
        "image_id": key,
        "identity_id": identity,
        "label": label,
        "source": source,
        "locator": locator,
        "box": [float(v) for v in box],
        "landmarks": np.asarray(landmarks, dtype=np.float32).tolist(),
        "age": None,
        "gender": None,
        "caption": caption,
        "width": image.width,
        "height": image.height,
    }
    return {
        "__key__": key,
        "jpg": _jpeg(image),
        "face.jpg": _jpeg(face),
        "json": json.dumps(meta, sort_keys=True).encode(),
        "embedding.npy": _npy(embedding),
        "landmarks.npy": _npy(landmarks),
    }


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
            samples.append(make_sample(key, identity, identity, "synthetic", locator, image, face, box, landmarks, embedding, caption))
        out[identity] = samples
    return out


def photo_samples(dev_folder: Path, identities: list[str], per_identity: int, faces) -> dict:
    """{identity_id: [sample, ...]} from real photos ``dev_folder/<Name>/*`` with dlib; photos
    where dlib finds no face are left out."""
    out = {}
    for name in identities:
        samples = []
        for path in sorted((Path(dev_folder) / name).iterdir()):
            if len(samples) == per_identity:
                break
            try:
                image = Image.open(path).convert("RGB")
            except OSError:
                continue
            if max(image.size) > 1024:
                image.thumbnail((1024, 1024))
            result = faces.analyze(image)
            if result is None:
                continue
            locator = f"{name}/{path.name}"
            key = image_id("fixtures", locator)
            caption = f"a photo of {name.replace('_', ' ')}"
            samples.append(
                make_sample(key, f"id-{name}", name, "fixtures", locator, image, result.chip, result.box,
                            result.landmarks, result.embedding, caption)
            )
        out[f"id-{name}"] = samples
    return out


def write_shards(folder: Path, samples_by_identity: dict, identities_per_shard: int) -> list[Path]:
    """Pack identities in order, ``identities_per_shard`` per shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identities = list(samples_by_identity)
    paths = []
    for index, start in enumerate(range(0, len(identities), identities_per_shard)):
        path = folder / f"shard-{index:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for identity in identities[start : start + identities_per_shard]:
                for sample in samples_by_identity[identity]:
                    sink.write(sample)
        paths.append(path)
    return paths


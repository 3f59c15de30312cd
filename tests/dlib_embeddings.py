"""Real dlib 128-d embeddings of the dev photos in ../shared/fixtures/faces, for clustering tests.

The face stages have their own dlib backend; this helper calls dlib directly so that the
clustering tests depend only on dlib and the fixture photos. It keeps the largest face of each
photo (the fixture README guarantees the labelled face is the largest). Tight 112px aligned crops
defeat the HOG detector without margin, so a photo with no detection is retried with a grey
border and one upsampling, and as a last resort the whole image is taken as the face box.

Computing the 293 embeddings takes ~half a minute of CPU, spread over the cores; ``dev_embeddings`` caches them on
disk under pytest's cache folder, keyed by the photos' names and sizes, so later runs skip it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
FACES_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "faces"
DEV_DIR = FACES_FIXTURES / "dev"
NEGATIVES_DIR = FACES_FIXTURES / "negatives"
# Faces of people outside dev. couple.jpg and selfie-many-people.jpg show Angelina_Jolie, so they
# are left out: their largest face could be her.
NEGATIVE_KINDS = ("singleton", "group", "tiny_face")
NEGATIVES_SHOWING_DEV = {"couple.jpg", "selfie-many-people.jpg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1"


@dataclass
class DevEmbeddings:
    files: list[str]  # relative to DEV_DIR
    labels: list[str]  # identity folder names
    embeddings: np.ndarray  # (n, 128) float32, L2-normalised


def dev_files() -> list[Path]:
    return sorted(p for p in DEV_DIR.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _model_path(name: str) -> str:
    # face_recognition_models imports pkg_resources on import; locating its folder avoids that.
    spec = importlib.util.find_spec("face_recognition_models")
    return str(Path(spec.submodule_search_locations[0]) / "models" / name)


class _Dlib:
    def __init__(self):
        import dlib

        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape5 = dlib.shape_predictor(_model_path("shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(_model_path("dlib_face_recognition_resnet_model_v1.dat"))

    def largest_face(self, rgb: np.ndarray, whole_image_fallback: bool = True):
        faces = list(self.detector(rgb, 0))
        if faces:
            return rgb, max(faces, key=lambda r: r.area())
        if not whole_image_fallback:
            faces = list(self.detector(rgb, 1))
            return (rgb, max(faces, key=lambda r: r.area())) if faces else (rgb, None)
        pad = max(rgb.shape[:2]) // 3
        padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=128)
        faces = list(self.detector(padded, 1))
        if faces:
            return padded, max(faces, key=lambda r: r.area())
        h, w = rgb.shape[:2]
        return rgb, self.dlib.rectangle(0, 0, w - 1, h - 1)

    def embed(self, rgb: np.ndarray, whole_image_fallback: bool = True) -> np.ndarray | None:
        image, rect = self.largest_face(rgb, whole_image_fallback)
        if rect is None:
            return None
        shape = self.shape5(image, rect)
        vec = np.asarray(self.encoder.compute_face_descriptor(image, shape), dtype=np.float32)
        return vec / np.linalg.norm(vec)


def _embed_files(files: list[Path], whole_image_fallback: bool) -> np.ndarray:
    from portrait.decode import load_rgb

    model = _Dlib()
    out = np.full((len(files), 128), np.nan, dtype=np.float32)
    for i, path in enumerate(files):
        vec = model.embed(np.asarray(load_rgb(path.read_bytes())), whole_image_fallback)
        if vec is not None:
            out[i] = vec
    return out


def _on_every_core(fn, files: list[Path], *args) -> np.ndarray:
    """``fn(chunk, *args)`` over contiguous chunks of ``files`` in one process per core, rows in order.

    dlib's ResNet runs one image at a time on one core; the first test that needs these embeddings
    waits for all of them, so both cores of a CI machine share the work.
    """
    workers = max(1, min(os.cpu_count() or 1, 4, len(files)))
    if workers == 1:
        return fn(files, *args)
    chunks = [list(c) for c in np.array_split(np.array(files, dtype=object), workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(fn, chunks, *[[a] * workers for a in args])))


def compute_embeddings(files: list[Path], whole_image_fallback: bool = True) -> np.ndarray:
    """(n, 128) embeddings; a row of NaN where no face was found (only without the fallback)."""
    return _on_every_core(_embed_files, files, whole_image_fallback)


def _cache_key(files: list[Path]) -> str:
    h = hashlib.sha1(EMBEDDING_MODEL.encode())
    for p in files:
        h.update(f"{p.relative_to(FACES_FIXTURES)}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _cached(files: list[Path], cache_dir: Path | None, prefix: str, whole_image_fallback: bool) -> np.ndarray:
    cache = cache_dir / f"{prefix}-{_cache_key(files)}.npy" if cache_dir is not None else None
    if cache is not None and cache.exists():
        return np.load(cache, allow_pickle=False)
    emb = compute_embeddings(files, whole_image_fallback)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, emb, allow_pickle=False)
    return emb


def dev_embeddings(cache_dir: Path | None = None) -> DevEmbeddings:
    files = dev_files()
    rel = [str(p.relative_to(DEV_DIR)) for p in files]
    labels = [p.parent.name for p in files]
    return DevEmbeddings(files=rel, labels=labels, embeddings=_cached(files, cache_dir, "dev", True))


def negative_embeddings(cache_dir: Path | None = None) -> DevEmbeddings:
    """Largest faces of negatives that show people outside dev; photos without a face are left out."""
    files = sorted(
        p
        for kind in NEGATIVE_KINDS
        for p in (NEGATIVES_DIR / kind).glob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in NEGATIVES_SHOWING_DEV
    )
    emb = _cached(files, cache_dir, "negatives", False)
    found = ~np.isnan(emb).any(axis=1)
    rel = [str(p.relative_to(NEGATIVES_DIR)) for p, ok in zip(files, found) if ok]
    return DevEmbeddings(files=rel, labels=[f"negative:{r}" for r in rel], embeddings=emb[found])


def _embed_variants(files: list[Path]) -> np.ndarray:
    from portrait.decode import load_rgb
    from devtools.reencode import VARIANTS, reencode

    model = _Dlib()
    emb = np.full((len(files) * len(VARIANTS), 128), np.nan, dtype=np.float32)
    for i, path in enumerate(files):
        rgb = np.asarray(load_rgb(path.read_bytes()))
        image, rect = model.largest_face(rgb)
        pad = (image.shape[0] - rgb.shape[0]) // 2  # largest_face may have padded the photo
        box = (rect.left() - pad, rect.top() - pad, rect.right() - pad, rect.bottom() - pad)
        for j, variant in enumerate(VARIANTS):
            emb[i * len(VARIANTS) + j] = model.embed(np.asarray(load_rgb(reencode(rgb, variant, box))))
    return emb


def variant_embeddings(cache_dir: Path | None = None, step: int = 3) -> DevEmbeddings:
    """Every ``step``-th dev photo re-encoded the way the web serves it (devtools/reencode.py:
    grayscale, CMYK, JPEG quality 40, EXIF-rotated, a 112 px face crop), embedded like the others."""
    from devtools.reencode import VARIANTS

    files = dev_files()[::step]
    cache = cache_dir / f"variants{step}-{_cache_key(files)}.npy" if cache_dir is not None else None
    if cache is not None and cache.exists():
        emb = np.load(cache, allow_pickle=False)
    else:
        emb = _on_every_core(_embed_variants, files)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, emb, allow_pickle=False)
    rel = [f"{p.relative_to(DEV_DIR)}#{v}" for p in files for v in VARIANTS]
    return DevEmbeddings(files=rel, labels=[p.parent.name for p in files for _ in VARIANTS], embeddings=emb)


if __name__ == "__main__":
    import time

    t = time.time()
    d = dev_embeddings(REPO_ROOT / ".pytest_cache" / "dlib_embeddings")
    neg = negative_embeddings(REPO_ROOT / ".pytest_cache" / "dlib_embeddings")
    print(f"{len(d.files)} dev and {len(neg.files)} negative embeddings in {time.time() - t:.1f}s")

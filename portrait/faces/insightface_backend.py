"""The insightface backend: SCRFD (RetinaFace-family) detection, ArcFace embedding, gender/age.

Models load from a local model pack folder in insightface's layout, each file through
``insightface.model_zoo.get_model`` (which picks the model class from the ONNX graph: a detector
has 6, 9, 10 or 15 outputs, an ArcFace model a square >= 112 px input, the gender/age model a
96 px input and 3 outputs, the 3D landmark model a 192 px input) and run by onnxruntime with the
CUDA provider when ``faces.device: cuda``. Nothing is downloaded: a missing folder or file is an
error that lists what is expected.

How to obtain a pack (on a machine with internet): download
https://github.com/deepinsight/insightface/releases/download/model-zoo/buffalo_l.zip (or
antelopev2.zip), unzip it into a folder named after the pack, and point ``faces.model_dir`` at
that folder. ``python -c "from insightface.app import FaceAnalysis; FaceAnalysis('buffalo_l')"``
does the same into ~/.insightface/models/buffalo_l. Mind the packs' licence (non-commercial
research use).

Batches (``faces.batch_size``, ``portrait/faces/batched.py``): ``detect_many`` runs the
detector on a batch of letterboxed images, ``embed_many`` and ``age_gender_many`` run ArcFace and
gender/age on a batch of aligned faces, one onnxruntime call each, when the model takes batches;
``batch_size: 1`` (or a model exported for one image) runs insightface's own per-image code.

Box convention: SCRFD was trained on WIDER FACE like RetinaFace and returns boxes in that
convention; they are used as they are. ``landmarks68`` come from the optional ``1k3d68.onnx``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from portrait.faces import batched, geometry
from portrait.faces.base import Face, FaceBackend

# role -> file name, per pack; roles marked optional may be absent
PACKS: dict[str, dict[str, str]] = {
    "buffalo_l": {
        "detection": "det_10g.onnx",
        "recognition": "w600k_r50.onnx",
        "genderage": "genderage.onnx",
        "landmark_3d_68": "1k3d68.onnx",
    },
    "antelopev2": {
        "detection": "scrfd_10g_bnkps.onnx",
        "recognition": "glintr100.onnx",
        "genderage": "genderage.onnx",
        "landmark_3d_68": "1k3d68.onnx",
    },
}
OPTIONAL = {"landmark_3d_68"}
ROLE_WORDS = {
    "detection": "SCRFD face detector",
    "recognition": "ArcFace recognition",
    "genderage": "gender and age",
    "landmark_3d_68": "68 landmarks, optional",
}
# Identity-distance thresholds of the packs' ArcFace recognisers (L2 between L2-normalised
# vectors), keyed by a pattern of the embedding_model name; the dedup and cluster stages'
# defaults. Not measured here (no ArcFace weights can be fetched on these machines): taken from
# ArcFace's published verification operating points (same-person cosine mostly above 0.4,
# different people mostly below 0.2 on LFW-like data). dedup 0.5 is a cosine of >= 0.875 (the
# same picture); cluster 1.15 a mean cosine of 0.34 between two sets. Re-measure both with
# datakit.stages.cluster.linkage_bounds on real ArcFace embeddings before a full run. attach (the looser
# distance of label-guided mode) equals cluster until measured by the procedure in datakit/stages/cluster.py.
THRESHOLDS = {
    "insightface": {"dedup": 0.5, "cluster": 1.15, "attach": 1.15},
    "arcface": {"dedup": 0.5, "cluster": 1.15, "attach": 1.15},
}
DOWNLOAD_URL = "https://github.com/deepinsight/insightface/releases/download/model-zoo/{pack}.zip"


def pack_name(settings, model_dir: Path) -> str:
    if settings.model_pack:
        return settings.model_pack
    return model_dir.name if model_dir.name in PACKS else "buffalo_l"


def model_files(settings, model_dir: Path | None) -> dict[str, Path]:
    """The pack's files by role; an error naming every expected file when one is missing."""
    if model_dir is None:
        raise FileNotFoundError("the insightface backend needs faces.model_dir (a model pack folder)")
    pack = pack_name(settings, model_dir)
    layout = PACKS[pack]
    files = {role: model_dir / name for role, name in layout.items()}
    missing = [p.name for role, p in files.items() if role not in OPTIONAL and not p.is_file()]
    if missing or not model_dir.is_dir():
        expected = "; ".join(f"{name} ({ROLE_WORDS[role]})" for role, name in layout.items())
        what = f"folder {model_dir} does not exist" if not model_dir.is_dir() else f"{model_dir} lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"insightface model pack {pack!r}: {what}. Expected files: {expected}. "
            f"Obtain the pack on a machine with internet from {DOWNLOAD_URL.format(pack=pack)}, "
            f"unzip it into a folder and set faces.model_dir to that folder (faces.model_pack picks the layout)."
        )
    return {role: p for role, p in files.items() if p.is_file()}


class InsightFaceBackend(FaceBackend):
    name = "insightface"
    embedding_dim = 512
    box_convention = "SCRFD boxes are RetinaFace's convention (WIDER FACE); used unchanged"

    def __init__(self, settings, model_dir: Path | None):
        self.settings = settings
        self.model_dir = Path(model_dir) if model_dir else None
        self.files = model_files(settings, self.model_dir)
        self.pack = pack_name(settings, self.model_dir)
        self.models = {role: self._load(role, path) for role, path in self.files.items()}
        self.detector = self.models["detection"]
        self.recognizer = self.models["recognition"]
        self.genderage = self.models["genderage"]
        self.landmarks68 = self.models.get("landmark_3d_68")
        self.embedding_model = f"insightface:{self.pack}/{self.files['recognition'].name}"
        self.embedding_dim = int(self.recognizer.output_shape[-1]) if self.recognizer.output_shape else 512
        self.min_score = 0.5 if settings.min_score is None else float(settings.min_score)
        ctx_id = settings.gpu_id if settings.device == "cuda" else -1
        size = self.detector_size()
        for role, model in self.models.items():
            if role == "detection":
                model.prepare(ctx_id, input_size=(size, size), det_thresh=self.min_score)
            else:
                model.prepare(ctx_id)
        self.timings: dict[str, float] = defaultdict(float)
        self.batch_size = settings.batch_size
        self.batched_detector = None
        if self.batch_size > 1 and batched.detector_batches(self.detector):
            self.batched_detector = batched.BatchedDetector(self.detector, bind=settings.device == "cuda")

    def _batches_of(self, model) -> int:
        """Faces per onnxruntime call for ``model``: batch_size when it takes batches, else 1."""
        return self.batch_size if batched.batch_axis_is_free(model.session) else 1

    def _load(self, role: str, path: Path):
        import onnxruntime
        from insightface.model_zoo import model_zoo

        options = onnxruntime.SessionOptions()
        if self.settings.threads:
            options.intra_op_num_threads = self.settings.threads
            options.inter_op_num_threads = 1
        model = model_zoo.get_model(str(path), providers=self.settings.onnx_providers(), sess_options=options)
        task = getattr(model, "taskname", None)
        if task != role:
            raise ValueError(
                f"{path}: expected a {ROLE_WORDS[role]} model but insightface reads it as "
                f"{task or 'no model it knows'} (from its inputs and outputs); is the file in the right place?"
            )
        return model

    def detector_size(self) -> int:
        # SCRFD letterboxes its input into a square; its strides need a multiple of 32.
        return max(32, int(self.settings.detect_max_side) // 32 * 32)

    def model_files(self) -> dict[str, Path]:
        return dict(self.files)

    @property
    def has_age_gender_model(self) -> bool:
        return True

    # detection -------------------------------------------------------------------------
    def _run_detector(self, img: np.ndarray) -> geometry.Detections:
        size = self.detector_size()
        bgr = np.ascontiguousarray(img[..., ::-1])
        det, kps = self.detector.detect(bgr, input_size=(size, size), max_num=0, det_thresh=self.min_score)
        if kps is None:
            raise ValueError(f"{self.files['detection']}: the detector gives no landmarks (a *kps model is needed)")
        return det[:, :4], det[:, 4], kps

    def _run_detector_many(self, copies: list[np.ndarray]) -> list[geometry.Detections]:
        if self.batched_detector is None:
            return [self._run_detector(c) for c in copies]
        size = self.detector_size()
        found = []
        for start in range(0, len(copies), self.batch_size):
            found += self.batched_detector.detect(copies[start : start + self.batch_size], size, self.min_score)
        return found

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_many([rgb])[0]

    def detect_many(self, images: list[np.ndarray]) -> list[list[Face]]:
        s = self.settings
        t0 = time.perf_counter()
        # No enlarged retry: SCRFD resizes its input to the detector size anyway.
        found = geometry.detect_on_copies(
            images, self._run_detector_many, s.detect_min_side, s.detect_max_side, s.detect_pad, False
        )
        t1 = time.perf_counter()
        faces = [self._faces(rgb, *detections) for rgb, detections in zip(images, found)]
        self.timings["detect"] += t1 - t0
        self.timings["landmarks"] += time.perf_counter() - t1
        return faces

    def _faces(self, rgb: np.ndarray, boxes, scores, points) -> list[Face]:
        faces = []
        bgr = None
        for i in range(len(boxes)):
            face = Face(box=tuple(float(v) for v in boxes[i]), score=float(scores[i]), landmarks5=points[i])
            if self.landmarks68 is not None:
                bgr = np.ascontiguousarray(rgb[..., ::-1]) if bgr is None else bgr
                face.landmarks68 = self._landmarks68(bgr, face)
            faces.append(face)
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _landmarks68(self, bgr: np.ndarray, face: Face) -> np.ndarray:
        points = self.landmarks68.get(bgr, _insightface_face(face))
        return np.asarray(points, dtype=np.float64)[:, :2]

    # embedding and attributes ----------------------------------------------------------
    def embed(self, rgb: np.ndarray, face: Face, crop_size: int = 256, crop_padding: float = 0.25):
        return self.embed_many([(rgb, face)], crop_size, crop_padding)[0]

    def embed_many(self, items: list[tuple[np.ndarray, Face]], crop_size: int = 256, crop_padding: float = 0.25):
        from insightface.utils import face_align

        t0 = time.perf_counter()
        side = int(self.recognizer.input_size[0])
        aligned = [
            face_align.norm_crop(np.ascontiguousarray(rgb[..., ::-1]), landmark=np.asarray(face.landmarks5, dtype=np.float32), image_size=side)
            for rgb, face in items
        ]
        step = self._batches_of(self.recognizer)
        vectors = np.concatenate(
            [np.asarray(self.recognizer.get_feat(aligned[i : i + step]), dtype=np.float32) for i in range(0, len(aligned), step)]
        ) if aligned else np.empty((0, self.embedding_dim), np.float32)  # fmt: skip
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        crops = [geometry.similarity_crop(rgb, face.landmarks5, crop_size, crop_padding) for rgb, face in items]
        self.timings["embed"] += time.perf_counter() - t0
        return list(zip(vectors, crops))

    def age_gender(self, rgb: np.ndarray, face: Face) -> tuple[float | None, str | None]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        gender, age = self.genderage.get(bgr, _insightface_face(face))
        # insightface's convention: 1 is male, 0 female
        return float(age), ("male" if int(gender) == 1 else "female")

    def age_gender_many(self, items: list[tuple[np.ndarray, Face]]) -> list[tuple[float | None, str | None]]:
        """As ``age_gender`` (insightface's Attribute.get: the box's centre, 1.5x its longer
        side, at the model's input size), one onnxruntime call per batch."""
        step = self._batches_of(self.genderage)
        if step == 1:
            return [self.age_gender(rgb, face) for rgb, face in items]
        from insightface.utils import face_align

        model = self.genderage
        side = model.input_size[0]
        chips = []
        for rgb, face in items:
            x0, y0, x1, y1 = _insightface_face(face).bbox
            scale = side / (max(x1 - x0, y1 - y0) * 1.5)
            chip, _ = face_align.transform(np.ascontiguousarray(rgb[..., ::-1]), ((x0 + x1) / 2, (y0 + y1) / 2), side, scale, 0)
            chips.append(chip)
        results = []
        for i in range(0, len(chips), step):
            blob = cv2.dnn.blobFromImages(chips[i : i + step], 1.0 / model.input_std, (side, side), (model.input_mean,) * 3, swapRB=True)
            for pred in model.session.run(model.output_names, {model.input_name: blob})[0]:
                gender, age = int(np.argmax(pred[:2])), int(np.round(pred[2] * 100))
                results.append((float(age), "male" if gender == 1 else "female"))
        return results


def _insightface_face(face: Face):
    from insightface.app.common import Face as InsightFace

    return InsightFace(
        bbox=np.asarray(face.box, dtype=np.float32),
        kps=np.asarray(face.landmarks5, dtype=np.float32),
        det_score=face.score,
    )

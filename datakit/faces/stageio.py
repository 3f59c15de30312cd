"""What the face stages share: reading their input rows and building the update table.

Each face stage returns ``image_id``, the drop columns (``status``, ``drop_stage``, ``reason``,
``detail``) and the columns it adds, one row per input row. Rows an earlier stage dropped keep
their drop columns and get nulls in the new ones.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from datakit import schema
from portrait.faces import FaceSettings, load_backend, model_provenance
from portrait.faces.base import Face
from datakit.stage import Stage

DROP_COLUMNS = ("status", "drop_stage", "reason", "detail")


def input_rows(table: pa.Table, columns: tuple[str, ...]) -> list[dict]:
    """The drop columns and ``columns`` of every row, as dicts (missing columns read as null)."""
    names = ("image_id", *DROP_COLUMNS, *columns)
    data = {n: table.column(n).to_pylist() if n in table.column_names else [None] * table.num_rows for n in names}
    return [{n: data[n][i] for n in names} for i in range(table.num_rows)]


def update_table(rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    """``image_id``, the drop columns and ``columns``, typed as in the manifest schema."""
    types = {n: t for n, (t, _) in schema.IMAGE_COLUMNS.items()}
    types["face_crop"] = pa.binary()
    names = ("image_id", *DROP_COLUMNS, *columns)
    return pa.table({n: pa.array([r.get(n) for r in rows], type=types[n]) for n in names})


def face_settings(context: dict) -> FaceSettings:
    value = context.get("faces")
    return value if isinstance(value, FaceSettings) else FaceSettings.model_validate(value or {})


def backend_from_context(context: dict, num_cpus: float | None = None):
    """The backend for one worker. Unless the recipe sets ``faces.threads``, onnxruntime gets as
    many threads as the worker's CPU share (at least one): its default, every core, would make
    the workers of a pool fight over the same cores."""
    settings = face_settings(context)
    if settings.threads is None and num_cpus is not None:
        settings = settings.model_copy(update={"threads": max(1, int(num_cpus))})
    return load_backend(settings, base_dir=context.get("recipe_dir"))


def floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def face_from_row(row: dict) -> Face:
    """The subject's face as the detect stage recorded it."""
    if row.get("face_box") is None or row.get("landmarks5") is None:
        raise ValueError(
            f"row {row['image_id']}: no face box or landmarks; the detect stage must run before this one"
        )
    lm68 = row.get("landmarks68")
    return Face(
        box=tuple(row["face_box"]),
        score=row.get("face_score") or 0.0,
        landmarks5=np.asarray(row["landmarks5"], dtype=np.float64).reshape(5, 2),
        landmarks68=None if lm68 is None else np.asarray(lm68, dtype=np.float64).reshape(68, 2),
    )


class FaceModelStage(Stage):
    """A partition stage that runs the face backend on each kept row's image.

    Subclasses name the columns they read (``NEEDS``) and write (``COLUMNS``) and implement
    ``process_row(row, image_bytes)``, which fills the row in place (or drops it).
    """

    uses_model = True
    NEEDS: tuple[str, ...] = ()
    COLUMNS: tuple[str, ...] = ()

    @classmethod
    def provenance(cls, settings, context) -> dict:
        return model_provenance(face_settings(context), context.get("recipe_dir"))

    def setup(self) -> None:
        self.backend = backend_from_context(self.context, self.settings.num_cpus)

    def process(self, table: pa.Table) -> pa.Table:
        rows = input_rows(table, self.NEEDS)
        blobs = table.column("image_bytes").to_pylist()
        for row, blob in zip(rows, blobs):
            if row["status"] == schema.KEPT:
                self.process_row(row, blob)
        return update_table(rows, self.COLUMNS)

    def process_row(self, row: dict, blob: bytes) -> None:
        raise NotImplementedError

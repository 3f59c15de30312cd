"""Turn a stage's answer into the rows the work folder keeps: the one place decisions are settled.

Every work-folder file of a step holds, for every row of its partition (same order): the
``image_id``, the four decision columns and the columns the step adds. Rules:

- The first drop stands: only rows still kept reach a stage, so a later stage cannot revive a
  dropped row or rewrite why it was dropped.
- A row the stage did not see (dropped earlier) keeps the value an added column already had,
  else null.
- A stage may add a ``detail`` to a row it keeps (a note such as "reassigned"); a null keeps the
  earlier note.
- Every column is typed from ``datakit.schema`` (or the stage's ``work_types`` for work-folder
  columns); reason codes are checked there too.

A redaction is settled here as well (:func:`redact_rows`), for images.parquet and for the work
folder alike.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from datakit import schema
from datakit.stage import Output, Stage

DECISION_COLUMNS = ("status", "drop_stage", "reason", "detail")
REDACTION_COLUMNS = ("redacted_at", "redaction_reason")


def column_type(name: str, stage: Stage | None = None) -> pa.DataType:
    if name in schema.IMAGE_COLUMNS:
        return schema.IMAGE_COLUMNS[name][0]
    if name in schema.WORK_COLUMNS:
        return schema.WORK_COLUMNS[name]
    if stage is not None and name in stage.work_types:
        return stage.work_types[name]
    raise ValueError(f"column {name!r} is neither in datakit.schema nor in the stage's work_types")


def live_positions(view: pa.Table) -> list[int]:
    """Rows still in play (not dropped or redacted by an earlier stage)."""
    return [i for i, s in enumerate(view.column("status").to_pylist()) if s == schema.KEPT]


def check_output(stage: Stage, output: Output, rows: int) -> None:
    extra = [c for c in output.values if c not in stage.adds]
    if extra:
        raise ValueError(f"stage {stage.name} returned columns it does not declare in adds: {extra}")
    for name, values in output.values.items():
        if len(values) != rows:
            raise ValueError(f"stage {stage.name} returned {len(values)} values of {name} for {rows} rows")
    for i, (reason, _) in output.drops.items():
        if not 0 <= i < rows:
            raise ValueError(f"stage {stage.name} dropped row {i} of {rows}")
        schema.check_reason(reason)


def settle(stage: Stage, view: pa.Table, live: list[int], output: Output) -> pa.Table:
    """The step's work-folder table for ``view`` (all rows of the partition, or of the build)."""
    check_output(stage, output, len(live))
    n = view.num_rows
    decisions = {c: list(view.column(c).to_pylist()) if c in view.column_names else [None] * n for c in DECISION_COLUMNS}
    notes = output.values.get("detail")
    if notes is not None:
        for j, i in enumerate(live):
            decisions["detail"][i] = notes[j] if notes[j] is not None else decisions["detail"][i]
    for j, (reason, detail) in output.drops.items():
        i = live[j]
        decisions["status"][i], decisions["drop_stage"][i] = schema.DROPPED, stage.drop_stage
        decisions["reason"][i], decisions["detail"][i] = reason, detail
    columns = {"image_id": view.column("image_id")}
    columns.update({c: pa.array(v, pa.string()) for c, v in decisions.items()})
    for name in stage.adds:
        if name in DECISION_COLUMNS:
            continue
        kind = column_type(name, stage)
        before = view.column(name).to_pylist() if name in view.column_names else [None] * n
        values = output.values.get(name)
        if values is not None:
            for j, i in enumerate(live):
                before[i] = values[j]
        columns[name] = pa.array(before, kind)
    return pa.table(columns)


def stage_error(stage: Stage, error: BaseException) -> tuple[str, str]:
    return "stage_error", f"{type(error).__name__}: {error}"[:500]


# ---------------------------------------------------------------- redaction


def redact_rows(table: pa.Table, redact: set[str], also_drop: dict[str, str], reason: str, stamp: str, drop_stage: str) -> pa.Table:
    """Mark rows redacted (``redact``) or dropped as ``identity_too_small`` (``also_drop``: id ->
    detail) in any table with ``image_id``; missing decision columns are added."""
    ids = table.column("image_id").to_pylist()
    names = (*DECISION_COLUMNS, *REDACTION_COLUMNS)
    values = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * len(ids)) for c in names}
    for i, image in enumerate(ids):
        if image in redact:
            values["status"][i], values["redacted_at"][i], values["redaction_reason"][i] = schema.REDACTED, stamp, reason
        elif image in also_drop:
            values["status"][i], values["drop_stage"][i] = schema.DROPPED, drop_stage
            values["reason"][i], values["detail"][i] = schema.check_reason("identity_too_small"), also_drop[image]
    for name, vals in values.items():
        kind = table.schema.field(name).type if name in table.column_names else pa.string()
        arr = pa.array(vals, kind)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def clear_columns(table: pa.Table, mask: pa.Array, names) -> pa.Table:
    """Null ``names`` in the rows of ``mask`` (a redaction's bytes and biometric templates)."""
    for name in names:
        if name in table.column_names:
            col = table[name]
            table = table.set_column(table.column_names.index(name), name, pc.if_else(mask, pa.nulls(len(table), col.type), col))
    return table

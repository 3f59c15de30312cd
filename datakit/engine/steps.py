"""Run one step on the work folder: read what it declares, call it, settle, write.

``run_partition`` does one partition of a partition step (any executor calls it, in a Ray actor
or in this process); ``run_global`` does a global step over every partition at once. Both read
only the columns the step declares (plus the decision columns), hand the step the rows still in
play, settle its answer (``datakit.engine.settle``) and write one file per partition with its
stats. A partition step that raises on a partition is run again row by row, so one bad item
ends as a ``stage_error`` row instead of stopping the build.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow as pa

from datakit import schema
from datakit.engine import reuse
from datakit.engine.settle import DECISION_COLUMNS, check_output, column_type, live_positions, settle, stage_error
from datakit.stage import Output, Stage
from datakit.store import WorkDir, atomic_write_table

log = logging.getLogger("datakit")

WRITE_ATTEMPTS = 4


def view_columns(stage: Stage) -> list[str]:
    """What the engine reads for a step: ids, decisions, what it reads and what it adds
    (an added column keeps its earlier value in rows the step does not see)."""
    return list(dict.fromkeys(["image_id", *DECISION_COLUMNS, *stage.reads, *stage.adds]))


def live_rows(stage: Stage, view: pa.Table, live: list[int]) -> pa.Table:
    """The rows a step sees: ``image_id`` and its ``reads``, live rows only; a column no earlier
    step wrote comes as typed nulls."""
    taken = view.take(pa.array(live, pa.int64()))
    columns = {"image_id": taken.column("image_id")}
    for name in stage.reads:
        if name in taken.column_names:
            columns[name] = taken.column(name)
        else:
            try:
                kind = column_type(name)
            except ValueError:
                kind = pa.null()
            columns[name] = pa.nulls(len(live), kind)
    return pa.table(columns)


def decide(stage: Stage, view: pa.Table, previous: pa.Table | None = None) -> pa.Table:
    """The step's table for a partition (or any view)."""
    return decide_reusing(stage, view, previous)[0]


def decide_reusing(stage: Stage, view: pa.Table, previous: pa.Table | None = None) -> tuple[pa.Table, pa.Array, int]:
    """(the step's table, each live row's input digest, rows carried). With ``previous`` (rows a
    rebuild set aside), a live row whose input digest matches an earlier answer takes that
    answer instead of being computed."""
    live = live_positions(view)
    digests = reuse.row_digests(view_columns(stage)[2:], view, live, step_digest(stage))
    ids = view.column("image_id").to_pylist()
    taken = reuse.carried(previous, [ids[i] for i in live], digests)
    if taken and not stage.batch_invariant and not reuse.same_batch(previous, taken, len(live)):
        taken = {}
    todo = [i for j, i in enumerate(live) if j not in taken]
    rows = live_rows(stage, view, todo)
    try:
        table = settle(stage, view, todo, stage.process(rows) if todo else empty_output(stage))
    except Exception as error:  # noqa: BLE001 - one bad item must not stop the run
        log.warning("stage %s failed on a partition as a whole (%s); retrying item by item", stage.name, error)
        table = settle(stage, view, todo, item_by_item(stage, rows))
    if taken:
        table = lay_over(table, previous, {live[j]: r for j, r in taken.items()})
    column = [None] * view.num_rows
    for i, d in zip(live, digests):
        column[i] = d
    return table, pa.array(column, pa.string()), len(taken)


def empty_output(stage: Stage) -> Output:
    return Output(values={c: [] for c in stage.adds})


def lay_over(table: pa.Table, previous: pa.Table, rows: dict[int, int]) -> pa.Table:
    """``table`` with row i replaced by ``previous``'s row ``rows[i]`` (same columns, same types)."""
    earlier = previous.select(table.column_names).cast(table.schema)
    picks = [table.num_rows + rows[i] if i in rows else i for i in range(table.num_rows)]
    return pa.concat_tables([table, earlier]).take(pa.array(picks, pa.int64()))


def step_digest(stage: Stage) -> str:
    """The digest of what the step depends on besides its rows (from the plan; a stage run
    outside a build has none and carries nothing)."""
    return (stage.context.get("step_digests") or {}).get(stage.name, "")


def fingerprint(stage: Stage, part: int) -> str | None:
    fps = (stage.context.get("fingerprints") or {}).get(stage.name)
    return fps[part] if fps and part < len(fps) else None


def item_by_item(stage: Stage, rows: pa.Table) -> Output:
    """The step on one row at a time; a row that raises is dropped with stage_error."""
    merged = Output(values={c: [None] * rows.num_rows for c in stage.adds})
    for j in range(rows.num_rows):
        try:
            out = stage.process(rows.slice(j, 1))
            check_output(stage, out, 1)
        except Exception as error:  # noqa: BLE001
            merged.drops[j] = stage_error(stage, error)
            continue
        for name, values in out.values.items():
            merged.values[name][j] = values[0]
        if 0 in out.drops:
            merged.drops[j] = out.drops[0]
    return merged


def run_partition(stage: Stage, work: WorkDir, part: int, upstream: list[str],
                  held: dict[str, pa.Table] | None = None) -> None:
    """One step on one partition, its file written. ``held``: this partition's tables a worker
    keeps while it runs several steps on it (``WorkDir.read_view``); the step's own is added."""
    if work.part_done(stage.name, part):
        return
    view = work.read_view(part, upstream, columns=view_columns(stage), held=held)
    t0 = time.perf_counter()
    table, digests, carried = decide_reusing(stage, view, reuse.previous_rows(work, stage.name, part))
    table = table.append_column(reuse.DIGEST_COLUMN, digests)  # what a later rebuild compares against
    seconds = time.perf_counter() - t0
    stats = partition_stats(stage.name, part, view, table, seconds) | {"fingerprint": fingerprint(stage, part), "carried": carried}
    write_with_retries(work, stage.name, part, table, stats)
    if held is not None:
        held[stage.name] = table


def run_global(stage: Stage, work: WorkDir, upstream: list[str]) -> None:
    if work.is_done(stage.name):
        return
    views = list(work.iter_views(upstream, columns=view_columns(stage)))
    if "part" in stage.reads:  # where each row's work files are, for the step's fan-out
        views = [v.append_column("part", pa.array([p] * v.num_rows, pa.int64())) for p, v in enumerate(views)]
    bulky = [f.name for v in views[:1] for f in v.schema if pa.types.is_binary(f.type) and f.name in stage.reads]
    if bulky:
        raise ValueError(f"global stage {stage.name} reads bulk columns {bulky}; a partition step must reduce them first")
    view = pa.concat_tables(views, promote_options="permissive")
    t0 = time.perf_counter()
    live = live_positions(view)
    output = stage.process(live_rows(stage, view, live))
    table = settle(stage, view, live, output)
    seconds = time.perf_counter() - t0
    write_extra_tables(work, stage.name, output.tables)
    offset = 0
    for part, piece_view in enumerate(views):
        piece = table.slice(offset, piece_view.num_rows)
        offset += piece_view.num_rows
        share = seconds * piece_view.num_rows / max(1, view.num_rows)
        stats = partition_stats(stage.name, part, piece_view, piece, share) | {"fingerprint": fingerprint(stage, part)}
        write_with_retries(work, stage.name, part, piece, stats)
    work.mark_done(stage.name, {"partitions": len(views), "seconds": round(seconds, 3)})


def write_with_retries(work: WorkDir, stage: str, part: int, table: pa.Table, stats: dict) -> None:
    """A flaky disk or network file system gets a few tries before the partition fails."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            work.write_part(stage, part, table, stats)
            return
        except OSError as error:
            if attempt == WRITE_ATTEMPTS:
                raise
            log.warning("stage %s part %d: write failed (%s); trying again", stage, part, error)
            time.sleep(0.5 * 2 ** (attempt - 1))


def write_extra_tables(work: WorkDir, stage: str, tables: dict[str, pa.Table]) -> None:
    for name, table in tables.items():
        atomic_write_table(work.stage_dir(stage) / f"{name}.parquet", table)


def partition_stats(stage: str, part: int, view: pa.Table, update: pa.Table, seconds: float) -> dict:
    before = view.column("status").to_pylist()
    after = update.column("status").to_pylist()
    reasons = update.column("reason").to_pylist()
    dropped = Counter(r for b, a, r in zip(before, after, reasons) if b == schema.KEPT and a != schema.KEPT)
    return {
        "stage": stage,
        "part": part,
        "items_in": sum(1 for b in before if b == schema.KEPT),
        "kept": sum(1 for a in after if a == schema.KEPT),
        "dropped": dict(sorted(dropped.items())),
        "seconds": round(seconds, 4),
    }

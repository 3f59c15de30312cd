"""Run a recipe: enumerate items, run the stages on Ray Data, write the manifests.

Consecutive partition stages form one Ray Data pipeline, so partition 7 can be in ``detect``
while partition 8 is still downloading. The rows that flow through Ray are partition numbers;
the data itself moves through the work folder (``datakit.store``), one atomic file per stage
and partition. That file is the checkpoint: a run started again (after a crash, a SIGKILL, a
lost node) skips every partition whose file exists and ends with the same manifests.

Global stages (duplicates across sources, clustering, sharding) see every partition at once
and run as one Ray task after the partition stages before them are done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from datakit import __version__, registry, schema
from datakit.recipe import Recipe
from datakit.sources import apply_redactions, items_table, iter_items, read_redactions
from datakit.stage import Stage
from datakit.watchdog import Stalled, StallWatch
from datakit.store import BULK_COLUMNS, ITEMS, Location, WorkDir, atomic_write_json, atomic_write_table, remove_tree

log = logging.getLogger("datakit")


class BuildMismatch(RuntimeError):
    """The output folder holds a build of a different recipe."""


@dataclass
class RunResult:
    output: Location
    items: int
    kept: int
    dropped_by_reason: dict[str, int]
    stages: dict[str, dict] = field(default_factory=dict)
    wall_seconds: float = 0.0
    stall_restarts: int = 0  # pipelines the stall watchdog restarted during this run


# ---------------------------------------------------------------- entry point


def run(recipe: Recipe, address: str | None = None, restart: bool = False, quiet: bool = False) -> RunResult:
    started = time.time()
    work = WorkDir(recipe.output, recipe.storage_options)
    prepare_output(work, recipe, restart)
    enumerate_items(work, recipe)
    context = stage_context(recipe)
    connect(address or recipe.ray.address, recipe.ray.num_cpus, quiet)
    names = recipe.stage_names()
    restarts = 0
    for segment in segments(names):
        upstream = names[: names.index(segment[0])]
        if registry.stage_class(segment[0]).kind == "global":
            run_global(work, recipe, segment[0], upstream, context, quiet)
        else:
            restarts += run_partition_segment(work, recipe, segment, upstream, context, quiet)
    images = write_images_manifest(work, names)
    result = summarize(work, images, names, time.time() - started)
    result.stall_restarts = restarts
    write_build_json(work, recipe, result, started, context)
    return result


def prepare_output(work: WorkDir, recipe: Recipe, restart: bool) -> None:
    recorded = work.root / "recipe.json"
    if restart and work.output.exists():
        remove_tree(work.root)
        for name in ("images.parquet", "build.json"):
            (work.output / name).unlink(missing_ok=True)
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous["hash"] != recipe.hash():
            raise BuildMismatch(
                f"{work.output} holds a build of a different recipe ({previous.get('file')}, "
                f"hash {previous['hash'][:12]}); the recipe's settings changed since. Use another "
                f"output folder, or --restart to discard that build."
            )
    else:
        atomic_write_json(recorded, {"hash": recipe.hash(), "file": str(recipe.path), "recipe": recipe.canonical()})
    removed = work.remove_temporaries()
    if removed:
        log.info("removed %d half-written files left by an interrupted run", removed)


def enumerate_items(work: WorkDir, recipe: Recipe) -> None:
    """Write the input items as fixed partitions, once; a resumed run reuses them."""
    if work.is_done(ITEMS):
        return
    rows = list(iter_items(recipe.sources, recipe.path))
    logs = list(recipe.redactions)
    if (work.output / "redactions.jsonl").exists():  # kept by --restart: an opt-out outlives the build
        logs.append(work.output / "redactions.jsonl")
    redacted = apply_redactions(rows, read_redactions(logs))
    if redacted:
        log.info("%d items were redacted in an earlier build and will not be fetched", redacted)
    size = recipe.ray.partition_size
    parts = max(1, (len(rows) + size - 1) // size)
    for part in range(parts):
        table = items_table(rows[part * size : (part + 1) * size])
        atomic_write_table(work.part_path(ITEMS, part), table)
    by_source = Counter(r["source"] for r in rows)
    work.mark_done(ITEMS, {"partitions": parts, "items": len(rows), "by_source": dict(by_source), "redacted": redacted})


def stage_context(recipe: Recipe) -> dict:
    needs_faces = recipe.faces is not None or any(n in recipe.stages for n in ("detect", "embed"))
    return {
        "output_dir": str(recipe.output),
        "recipe_dir": str(recipe.path.parent) if recipe.path else None,
        "recipe_name": recipe.name,
        "sources": {s.name: s.model_dump(mode="json") for s in recipe.sources},
        "source_order": [s.name for s in recipe.sources],
        "faces": recipe.face_settings() if needs_faces else None,
    }


def segments(names: list[str]) -> list[list[str]]:
    """Group consecutive partition stages; each global stage is a segment of its own."""
    out: list[list[str]] = []
    for name in names:
        kind = registry.stage_class(name).kind
        if kind == "partition" and out and registry.stage_class(out[-1][0]).kind == "partition":
            out[-1].append(name)
        else:
            out.append([name])
    return out


# ---------------------------------------------------------------- Ray


def connect(address: str | None, num_cpus: int | None, quiet: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = not quiet


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


class PartitionWorker:
    """One Ray Data worker of a partition stage: builds the stage once, then runs partitions."""

    def __init__(self, stage_cls: type[Stage], settings, context: dict, upstream: list[str], output: Location):
        self.stage: Stage = stage_cls(settings, context)
        self.stage.setup()
        self.work = WorkDir(output)
        self.upstream = upstream

    def __call__(self, batch: dict) -> dict:
        for part in batch["part"]:
            run_one_partition(self.stage, self.work, int(part), self.upstream)
        return batch


def run_partition_segment(work, recipe, segment, upstream, context, quiet) -> int:
    """Run consecutive partition stages to the end; returns how often a stall restarted them."""
    restarts = 0
    parts = range(work.num_parts())
    what = f"stage {'/'.join(segment)}"
    for attempt in range(recipe.ray.stall_restarts + 1):
        done = {name: work.done_parts(name) for name in segment}
        pending = [p for p in parts if not all(p in done[name] for name in segment)]
        if not pending:
            break
        # The watch interrupts the main thread; a run started from another thread goes without it.
        timeout = recipe.ray.stall_timeout if threading.current_thread() is threading.main_thread() else None
        watch = StallWatch(lambda: sum(len(work.done_parts(name)) for name in segment), timeout, what)
        try:
            with watch:
                run_pipeline(work, recipe, segment, upstream, context, pending)
            break
        except KeyboardInterrupt:
            if not watch.fired:
                raise  # the user's Ctrl-C
            restarts += 1
    else:
        raise Stalled(
            f"{what}: no partition finished within {recipe.ray.stall_timeout:g} s, "
            f"{recipe.ray.stall_restarts + 1} times; run the same command again to resume"
        )
    for name in segment:
        finished = work.done_parts(name)
        missing = [p for p in parts if p not in finished]
        if missing:
            raise RuntimeError(f"stage {name}: partitions {missing[:10]} did not finish")
        work.mark_done(name, {"partitions": len(parts)})
    return restarts


def run_pipeline(work, recipe, segment, upstream, context, pending: list[int]) -> None:
    """One Ray Data pipeline over the pending partitions: an actor pool per stage."""
    import ray

    ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
    for i, name in enumerate(segment):
        settings = recipe.stage_settings(name)
        cls = registry.stage_class(name)
        # A class named after the stage, so Ray's progress bars read "MapBatches(detect)".
        worker = type(name, (PartitionWorker,), {})
        pool = settings.concurrency or max(1, int(cluster_cpus() if cls.uses_model else cluster_cpus() * 2))
        ds = ds.map_batches(
            worker,
            batch_size=1,
            fn_constructor_kwargs=dict(
                stage_cls=cls,
                settings=settings,
                context=context,
                upstream=upstream + segment[:i],
                output=work.output,
            ),
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus or None,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        )
    for _ in ds.iter_batches(batch_size=None):
        pass


def run_one_partition(stage: Stage, work: WorkDir, part: int, upstream: list[str]) -> None:
    if work.part_done(stage.name, part):
        return
    view = work.read_view(part, upstream)
    t0 = time.perf_counter()
    try:
        update = stage.process(view)
        update = checked_update(stage.name, view, update)
    except Exception as error:  # noqa: BLE001 - one bad item must not stop the run
        log.warning("stage %s part %d failed as a whole (%s); retrying item by item", stage.name, part, error)
        update = process_item_by_item(stage, view)
    seconds = time.perf_counter() - t0
    write_with_retries(work, stage.name, part, update, partition_stats(stage.name, part, view, update, seconds))


WRITE_ATTEMPTS = 4


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


def checked_update(stage_name: str, view: pa.Table, update: pa.Table) -> pa.Table:
    if update.num_rows != view.num_rows:
        raise ValueError(f"stage {stage_name} returned {update.num_rows} rows for {view.num_rows}")
    if "image_id" not in update.column_names:
        update = update.append_column("image_id", view.column("image_id"))
    elif update.column("image_id") != view.column("image_id"):
        raise ValueError(f"stage {stage_name} returned rows out of order")
    for col in ("reason",):
        if col in update.column_names:
            for code in update.column(col).to_pylist():
                if code is not None:
                    schema.check_reason(code)
    return keep_earlier_drops(view, update)


DECISION_COLUMNS = ("status", "drop_stage", "reason", "detail")


def keep_earlier_drops(view: pa.Table, update: pa.Table) -> pa.Table:
    """Settle the decision columns of a stage's output against its input.

    The first drop stands: a later stage cannot revive a dropped row or rewrite why. A null
    in the output means "unchanged"; every output carries all four decision columns.
    """
    import pyarrow.compute as pc

    dropped_before = pc.not_equal(view.column("status"), schema.KEPT)
    for col in DECISION_COLUMNS:
        before = view.column(col) if col in view.column_names else pa.nulls(view.num_rows, pa.string())
        if col in update.column_names:
            after = pc.coalesce(update.column(col).cast(pa.string()), before)
            merged = pc.if_else(dropped_before, before, after)
            update = update.set_column(update.column_names.index(col), col, merged)
        else:
            update = update.append_column(col, before)
    return update


def process_item_by_item(stage: Stage, view: pa.Table) -> pa.Table:
    """Run the stage on one row at a time; a row that raises is dropped with stage_error."""
    pieces = []
    for i in range(view.num_rows):
        row = view.slice(i, 1)
        if row.column("status")[0].as_py() != schema.KEPT:
            pieces.append(row.select(["image_id"]))  # dropped earlier: nothing to do
            continue
        try:
            pieces.append(checked_update(stage.name, row, stage.process(row)))
        except Exception as error:  # noqa: BLE001
            pieces.append(
                pa.Table.from_pylist(
                    [
                        {
                            "image_id": row.column("image_id")[0].as_py(),
                            "status": schema.DROPPED,
                            "drop_stage": stage.name,
                            "reason": "stage_error",
                            "detail": f"{type(error).__name__}: {error}"[:500],
                        }
                    ]
                )
            )
    return keep_earlier_drops(view, pa.concat_tables(pieces, promote_options="permissive"))


def partition_stats(stage: str, part: int, view: pa.Table, update: pa.Table, seconds: float) -> dict:
    before = view.column("status").to_pylist()
    after = update.column("status").to_pylist() if "status" in update.column_names else before
    reasons = update.column("reason").to_pylist() if "reason" in update.column_names else [None] * len(before)
    dropped = Counter(r for b, a, r in zip(before, after, reasons) if b == schema.KEPT and a != schema.KEPT)
    return {
        "stage": stage,
        "part": part,
        "items_in": sum(1 for b in before if b == schema.KEPT),
        "kept": sum(1 for a in after if a == schema.KEPT),
        "dropped": dict(sorted(dropped.items())),
        "seconds": round(seconds, 4),
    }


def run_global(work, recipe, name, upstream, context, quiet) -> None:
    import ray

    if work.is_done(name):
        return
    settings = recipe.stage_settings(name)
    log.info("stage %s: running over all %d partitions", name, work.num_parts())
    task = ray.remote(_run_global_task).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus or None)
    cls = registry.stage_class(name)
    ray.get(task.remote(cls, settings, context, upstream, work.output))


def _run_global_task(cls, settings, context, upstream, output: Location) -> None:
    work = WorkDir(output)
    stage: Stage = cls(settings, context)
    name = stage.name
    stage.setup()
    t0 = time.perf_counter()
    update = stage.process_global(work, upstream)
    seconds = time.perf_counter() - t0
    offset = 0
    for part in range(work.num_parts()):
        view = work.read_view(part, upstream, columns=["image_id", *DECISION_COLUMNS])
        piece = checked_update(name, view, update.slice(offset, view.num_rows))
        offset += view.num_rows
        share = seconds * view.num_rows / max(1, update.num_rows)
        write_with_retries(work, name, part, piece, partition_stats(name, part, view, piece, share))
    if offset != update.num_rows:
        raise ValueError(f"stage {name} returned {update.num_rows} rows for {offset} items")
    work.mark_done(name, {"partitions": work.num_parts(), "seconds": round(seconds, 3)})


# ---------------------------------------------------------------- manifests


def write_images_manifest(work: WorkDir, names: list[str]) -> pa.Table:
    wanted = [c for c in schema.IMAGE_COLUMNS if c not in BULK_COLUMNS]
    table = schema.conform(work.read_all(names, columns=wanted))
    atomic_write_table(work.output / "images.parquet", table)
    return table


def summarize(work: WorkDir, images: pa.Table, names: list[str], wall: float) -> RunResult:
    status = images.column("status").to_pylist()
    # a redacted item has no drop reason; it is counted under its status
    reasons = Counter(r if s == schema.DROPPED else s for s, r in zip(status, images.column("reason").to_pylist()) if s != schema.KEPT)
    stages = {}
    for name in names:
        stats = work.read_stats(name)
        dropped: Counter = Counter()
        for s in stats:
            dropped.update(s["dropped"])
        stages[name] = {
            "items_in": sum(s["items_in"] for s in stats),
            "kept": sum(s["kept"] for s in stats),
            "dropped": dict(sorted(dropped.items())),
            "seconds": round(sum(s["seconds"] for s in stats), 3),
        }
    return RunResult(
        output=work.output,
        items=len(status),
        kept=status.count(schema.KEPT),
        dropped_by_reason=dict(sorted(reasons.items())),
        stages=stages,
        wall_seconds=round(wall, 3),
    )


def write_build_json(work: WorkDir, recipe: Recipe, result: RunResult, started: float, context: dict) -> None:
    items_info = json.loads(work.success_path(ITEMS).read_text())
    runs_path = work.root / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    runs.append(
        {"started": _iso(started), "finished": _iso(time.time()), "wall_seconds": result.wall_seconds, "stall_restarts": result.stall_restarts}
    )
    atomic_write_json(runs_path, runs)
    build = {
        "datakit_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
        "recipe_file": str(recipe.path),
        "recipe_hash": recipe.hash(),
        "recipe": recipe.canonical(),
        "packages": package_versions(),
        "models": model_provenance(recipe, context),
        "counts": {
            "items": result.items,
            "kept": result.kept,
            "dropped": result.items - result.kept,
            "dropped_by_reason": result.dropped_by_reason,
            "items_by_source": items_info.get("by_source", {}),
        },
        "stages": result.stages,
        "runs": runs,
    }
    atomic_write_json(work.output / "build.json", build)


def model_provenance(recipe: Recipe, context: dict) -> dict:
    out = {}
    for name in recipe.stage_names():
        cls = registry.stage_class(name)
        info = cls.provenance(recipe.stage_settings(name), context)
        if info:
            out[name] = info
    return out


def package_versions() -> dict:
    from importlib import metadata

    names = [
        "ray", "pyarrow", "pillow", "aiohttp", "numpy", "dlib-bin", "face-recognition-models",
        "insightface", "onnxruntime", "webdataset", "transformers", "torch", "imagehash", "gender-guesser",
    ]  # fmt: skip
    versions = {}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

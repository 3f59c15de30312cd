"""Run a recipe: enumerate items, run the plan's steps on an executor, write the manifests.

The rows an executor moves are partition numbers; the data itself moves through the work folder
(``datakit.store``), one atomic file per step and partition. That file is the checkpoint: a run
started again (after a crash, a SIGKILL, a lost node) skips every partition whose file exists
and ends with the same manifests. Consecutive partition steps run as one segment (see
``datakit.engine.plan``); a global step starts when everything before it is done.
"""

from __future__ import annotations

import logging
import threading
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datakit import schema
from datakit.cache import DownloadCache
from datakit.engine import manifests, reuse
from datakit.engine.display import Display
from datakit.engine.plan import Step, segments, steps
from datakit.engine.reuse import BuildPlan
from datakit.recipe import Recipe
from datakit.store import Location, WorkDir, atomic_write_json, is_local, remove_tree
from datakit.watchdog import Stalled, StallWatch

log = logging.getLogger("datakit")


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


def make_executor(name: str, verbose: bool = False, fuse: bool = True):
    if name == "local":
        from datakit.engine.local_executor import LocalExecutor

        return LocalExecutor()
    from datakit.engine.ray_executor import RayExecutor

    return RayExecutor(verbose=verbose, fuse=fuse)


def plan_build(recipe: Recipe, restart: bool = False) -> BuildPlan:
    """What ``run`` would reuse and recompute (reads the output folder, changes nothing)."""
    work = WorkDir(recipe.output, recipe.storage_options)
    return reuse.make_plan(work, recipe, steps(recipe), stage_context(recipe, work), restart=restart)


def run(recipe: Recipe, address: str | None = None, restart: bool = False, quiet: bool = False,
        verbose: bool = False, executor: str = "ray", on_plan: Callable[[BuildPlan], None] | None = None) -> RunResult:
    started = time.time()
    work = WorkDir(recipe.output, recipe.storage_options)
    prepare_output(work, recipe, restart)
    context = stage_context(recipe, work)
    plan = steps(recipe)
    build_plan = reuse.make_plan(work, recipe, plan, context)
    if on_plan is not None:
        on_plan(build_plan)
    reuse.apply_plan(work, build_plan, recipe)
    context.update(build_plan.context_entries())
    runner = make_executor(executor, verbose, recipe.ray.fuse_steps)
    names = [s.name for s in plan]
    display = Display(work, names, enabled=not quiet)
    # a shard step reused as it was keeps its manifests as written (a redaction may have rewritten them since)
    shards_done_before = work.is_done(manifests.SHARD_STEP)
    restarts = 0
    with runner.session(address or recipe.ray.address, recipe.ray.num_cpus, log_folder(work)), display:
        for segment in segments(plan):
            upstream = names[: names.index(segment[0].name)]
            if segment[0].kind == "global":
                run_global(work, runner, segment[0], upstream, context, display)
            else:
                restarts += run_partition_segment(work, recipe, runner, segment, upstream, context, display)
    images = manifests.write_images(work, names)
    if not shards_done_before:
        manifests.write_shard_manifests(work, images)
    manifests.write_removed(work, build_plan.removed, {i for i in images.column("image_id").to_pylist()})
    result = summarize(work, images, names, time.time() - started)
    result.stall_restarts = restarts
    manifests.write_build_json(work, recipe, result, started, model_provenance(recipe, context))
    reuse.finish(work)
    if recipe.cache is not None:
        DownloadCache(recipe.cache.path).prune(recipe.cache.max_bytes)
    return result


def log_folder(work: WorkDir) -> Path:
    """OUTPUT/logs for a local output; a local temporary folder for an object store's."""
    if is_local(work.output):
        return work.output / "logs"
    return Path(tempfile.gettempdir()) / "datakit-logs" / work.output.name


def prepare_output(work: WorkDir, recipe: Recipe, restart: bool) -> None:
    """--restart discards an earlier build; the recipe is recorded; half-written files go."""
    if restart and work.output.exists():
        remove_tree(work.root)
        for name in ("images.parquet", "build.json"):
            (work.output / name).unlink(missing_ok=True)
    atomic_write_json(work.root / "recipe.json", {"hash": recipe.hash(), "file": str(recipe.path), "recipe": recipe.canonical()})
    removed = work.remove_temporaries()
    if removed:
        log.warning("resuming: removed %d half-written files left by an interrupted run", removed)


def enumerate_items(work: WorkDir, recipe: Recipe) -> None:
    """Write the input items as fixed partitions when the sources changed (or never were)."""
    build_plan = reuse.make_plan(work, recipe, [], {})
    if build_plan.new_items is not None:
        reuse.write_items(work, build_plan, recipe)


def stage_context(recipe: Recipe, work: WorkDir | None = None) -> dict:
    needs_faces = recipe.faces is not None or any(n in recipe.stages for n in ("detect", "embed"))
    return {
        "output_dir": str(recipe.output),
        "output": work.output if work is not None else None,  # a location object (with storage options)
        "recipe_dir": str(recipe.path.parent) if recipe.path else None,
        "recipe_name": recipe.name,
        "sources": {s.name: s.model_dump(mode="json") for s in recipe.sources},
        "source_order": [s.name for s in recipe.sources],
        "faces": recipe.face_settings() if needs_faces else None,
        "cache": recipe.cache.path if recipe.cache is not None else None,  # the download cache, if any
    }


# ---------------------------------------------------------------- segments


def run_partition_segment(work, recipe, executor, segment: list[Step], upstream, context, display) -> int:
    """Run consecutive partition steps to the end; returns how often a stall restarted them."""
    restarts = 0
    parts = range(work.num_parts())
    names = [s.name for s in segment]
    # steps at the head of the segment that a rebuild reuses whole start no workers (no model load)
    while len(segment) > 1 and len(work.done_parts(segment[0].name)) == len(parts):
        upstream, segment = [*upstream, segment[0].name], segment[1:]
    what = f"stage {'/'.join(names)}"
    for attempt in range(recipe.ray.stall_restarts + 1):
        done = {s.name: work.done_parts(s.name) for s in segment}
        pending = [p for p in parts if not all(p in done[s.name] for s in segment)]
        if not pending:
            break
        # The watch interrupts the main thread; a run started from another thread goes without it.
        timeout = recipe.ray.stall_timeout if threading.current_thread() is threading.main_thread() else None
        watch = StallWatch(lambda: sum(len(work.done_parts(s.name)) for s in segment), timeout, what)
        try:
            with watch, display.watching([s.name for s in segment]):
                executor.run_partitions(work, segment, upstream, context, pending)
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
    for name in names:
        finished = work.done_parts(name)
        missing = [p for p in parts if p not in finished]
        if missing:
            raise RuntimeError(f"stage {name}: partitions {missing[:10]} did not finish")
        work.mark_done(name, {"partitions": len(parts)})
    return restarts


def run_global(work, executor, step: Step, upstream, context, display) -> None:
    if work.is_done(step.name):
        return
    log.info("stage %s: running over all %d partitions", step.name, work.num_parts())
    with display.watching([step.name]):
        executor.run_global(work, step, upstream, context)


# ---------------------------------------------------------------- results


def summarize(work: WorkDir, images, names: list[str], wall: float) -> RunResult:
    status = images.column("status").to_pylist()
    # a redacted item has no drop reason; it is counted under its status
    reasons = Counter(r if s == schema.DROPPED else s for s, r in zip(status, images.column("reason").to_pylist()) if s != schema.KEPT)
    return RunResult(
        output=work.output,
        items=len(status),
        kept=status.count(schema.KEPT),
        dropped_by_reason=dict(sorted(reasons.items())),
        stages=manifests.stage_summaries(work, names),
        wall_seconds=round(wall, 3),
    )


def model_provenance(recipe: Recipe, context: dict) -> dict:
    out = {}
    for step in steps(recipe):
        info = step.cls.provenance(step.settings, context)
        if info:
            out[step.cls.step_of or step.name] = info
    return out

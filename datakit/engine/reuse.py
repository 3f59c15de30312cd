"""What a run can keep of the build already in its output folder, and what it must redo.

Planning is read-only (``datakit run --plan`` stops after it): the sources' state is compared
with the one the items were enumerated from (a changed source is enumerated again, in memory),
and every partition of every step is compared by fingerprint (``datakit.engine.plan``) with the
fingerprint it was written with. A partition whose fingerprint matches is reused as it is.

Applying the plan writes the new items, moves every stale partition file to
``_work/_previous/<step>/`` and indexes it there: a recomputed partition takes, row by row, the
answer its step gave before to a row whose input is unchanged (same step settings, same values
in every column the step reads), and computes only the others. So a changed filter threshold
re-runs the filter, but ``embed`` only embeds the faces the filter now lets through, and a URL
added to a list is fetched alone. Nothing is carried across a change of the step's own
settings or model files, and global steps (dedup, cluster, shard) always decide again over the
whole build. ``_previous`` is removed when the run finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from datakit.engine.plan import Step, digest, partition_fingerprints, step_inputs
from datakit.recipe import Recipe
from datakit.sources import apply_redactions, items_table, iter_items, read_redactions, source_state
from datakit.store import (
    ITEMS, PARQUET_WRITE, WorkDir, atomic_write_json, atomic_write_table, move_file, read_columns, read_table, remove_tree,
)  # fmt: skip

log = logging.getLogger("datakit")

PREVIOUS = "_previous"  # under _work: the stale partitions a rebuild may take rows from
PLAN_RECORD = "plan.json"  # under _work: what each step depended on when the build was planned
DIGEST_COLUMN = "input_digest"  # in every partition step's file: what each live row's answer came from


@dataclass
class StepPlan:
    name: str
    kind: str
    reuse: list[int]
    recompute: list[int]
    why: str = ""


@dataclass
class BuildPlan:
    steps: list[StepPlan]
    inputs: dict[str, dict]  # step -> what it depends on besides its rows (recorded for the next plan)
    fingerprints: dict[str, list[str]]  # step -> fingerprint per partition
    sources_digest: str
    new_items: list[pa.Table] | None = None  # the items enumerated again, when a source changed
    items_change: str = ""  # e.g. "sources changed: web +1 -1"
    removed: list[dict] = field(default_factory=list)  # items no source lists any more
    restart: bool = False

    @property
    def changes_anything(self) -> bool:
        return self.new_items is not None or any(s.recompute for s in self.steps)

    def context_entries(self) -> dict:
        """What the steps need from the plan while they run (passed in the stage context)."""
        return {"fingerprints": self.fingerprints, "step_digests": {k: digest(v) for k, v in self.inputs.items()}}


# ---------------------------------------------------------------- planning (read-only)


def make_plan(work: WorkDir, recipe: Recipe, plan: list[Step], context: dict, restart: bool = False) -> BuildPlan:
    state = {
        "sources": [source_state(s, c) for s, c in zip(recipe.sources, recipe.canonical()["sources"])],
        "partition_size": recipe.ray.partition_size,
        "redactions": [file_digest(p) for p in redaction_logs(work, recipe)],
    }
    sources_digest = digest(state)
    marker = read_marker(work, ITEMS) if not restart else None
    new_items, items_change, removed = None, "", []
    if marker is not None and marker.get("sources") == sources_digest:
        items_fps = marker.get("fingerprints") or [file_digest(work.part_path(ITEMS, p)) for p in range(marker["partitions"])]
    else:
        new_items = enumerate_partitions(work, recipe)
        items_fps = [table_digest(t) for t in new_items]
        if marker is not None:
            items_change, removed = compare_items(work, marker, new_items)
    inputs = {step.name: step_inputs(step, context) for step in plan}
    fingerprints = partition_fingerprints(plan, {k: digest(v) for k, v in inputs.items()}, items_fps)
    previous = read_json(work.root / PLAN_RECORD) or {}
    steps_out: list[StepPlan] = []
    for step in plan:
        reuse, recompute = ([], list(range(len(items_fps)))) if restart else split_parts(work, step, fingerprints[step.name])
        why = ""
        if recompute:
            why = "--restart" if restart else explain(step, inputs[step.name], previous.get(step.name), steps_out, items_change, work)
        steps_out.append(StepPlan(step.name, step.kind, reuse, recompute, why))
    return BuildPlan(steps_out, inputs, fingerprints, sources_digest, new_items, items_change, removed, restart)


def redaction_logs(work: WorkDir, recipe: Recipe) -> list:
    logs = list(recipe.redactions)
    if (work.output / "redactions.jsonl").exists():  # kept by --restart: an opt-out outlives the build
        logs.append(work.output / "redactions.jsonl")
    return logs


def enumerate_partitions(work: WorkDir, recipe: Recipe) -> list[pa.Table]:
    """The sources' items as fixed partitions, as a build from scratch would lay them out."""
    rows = list(iter_items(recipe.sources, recipe.path))
    redacted = apply_redactions(rows, read_redactions(redaction_logs(work, recipe)))
    if redacted:
        log.info("%d items were redacted in an earlier build and will not be fetched", redacted)
    size = recipe.ray.partition_size
    parts = max(1, (len(rows) + size - 1) // size)
    return [items_table(rows[p * size : (p + 1) * size]) for p in range(parts)]


def compare_items(work: WorkDir, marker: dict, new_items: list[pa.Table]) -> tuple[str, list[dict]]:
    """A plain-words summary of what the sources' change does to the items, and the removed rows."""
    old = pa.concat_tables([read_columns(work.part_path(ITEMS, p), ["source", "locator"]) for p in range(marker["partitions"])])
    new = pa.concat_tables(new_items)
    new_ids = set(new.column("image_id").to_pylist())
    old_ids = set(old.column("image_id").to_pylist())
    removed = [r for r in old.to_pylist() if r["image_id"] not in new_ids]
    added = Counter(s for i, s in zip(new.column("image_id").to_pylist(), new.column("source").to_pylist()) if i not in old_ids)
    gone = Counter(r["source"] for r in removed)
    per_source = ", ".join(f"{s} +{added[s]} -{gone[s]}" for s in sorted(set(added) | set(gone)))
    return f"sources changed: {per_source or 'same items, new content'}", removed


def split_parts(work: WorkDir, step: Step, fingerprints: list[str]) -> tuple[list[int], list[int]]:
    """(partitions written with the fingerprint they would get now, the others)."""
    recorded = {s["part"]: s.get("fingerprint") for s in work.read_stats(step.name)} if work.stage_dir(step.name).exists() else {}
    done = work.done_parts(step.name)
    if step.kind == "global" and not work.is_done(step.name):
        done = set()
    reuse = [p for p, fp in enumerate(fingerprints) if p in done and recorded.get(p) == fp]
    kept = set(reuse)
    return reuse, [p for p in range(len(fingerprints)) if p not in kept]


def explain(step: Step, inputs: dict, before: dict | None, earlier: list[StepPlan], items_change: str, work: WorkDir) -> str:
    """Why a step has partitions to compute, in plain words."""
    if before is not None and before != inputs:
        return describe_change(before, inputs)
    redone = [s.name for s in earlier if s.recompute]
    if redone:
        return f"its input changed ({redone[0]} recomputes)"
    if items_change:
        return items_change
    return "not built yet" if not work.stage_dir(step.name).exists() else "unfinished"


def describe_change(before: dict, after: dict) -> str:
    old, new = before.get("settings", {}), after.get("settings", {})
    changed = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        return "settings changed: " + ", ".join(changed)
    for key, words in (("models", "model files changed"), ("faces", "face settings changed"), ("source_order", "source order changed")):
        if before.get(key) != after.get(key):
            return words
    return "changed"


def format_plan(plan: BuildPlan) -> list[str]:
    width = max(len(s.name) for s in plan.steps)
    lines = [f"plan: {plan.items_change}" if plan.items_change else "plan:"]
    for s in plan.steps:
        what = f"reuse {len(s.reuse)}, recompute {len(s.recompute)}"
        lines.append(f"  {s.name:<{width}}  {what:<26} {s.why}".rstrip())
    if plan.removed:
        lines.append(f"  {len(plan.removed)} items are no longer listed by their source: they leave the build (removed.parquet)")
    return lines


# ---------------------------------------------------------------- applying


def apply_plan(work: WorkDir, plan: BuildPlan, recipe: Recipe) -> None:
    """Make the work folder match the plan: new items, stale partitions set aside, indexes for carrying rows."""
    if plan.new_items is not None:
        write_items(work, plan, recipe)
    parts = len(next(iter(plan.fingerprints.values()), [])) or work.num_parts()
    item_ids: dict[int, list[str]] = {}  # read once, shared by every step's index
    for step in plan.steps:
        if step.kind == "global":
            if step.recompute:
                remove_tree(work.stage_dir(step.name))
            continue
        set_aside(work, step, parts)
        index_previous(work, step.name, parts, item_ids)
    atomic_write_json(work.root / PLAN_RECORD, plan.inputs)


def write_items(work: WorkDir, plan: BuildPlan, recipe: Recipe) -> None:
    old_parts = work.num_parts() if work.is_done(ITEMS) else 0
    rows = 0
    by_source: Counter = Counter()
    for part, table in enumerate(plan.new_items):
        atomic_write_table(work.part_path(ITEMS, part), table)
        rows += table.num_rows
        by_source.update(table.column("source").to_pylist())
    for part in range(len(plan.new_items), old_parts):
        work.part_path(ITEMS, part).unlink(missing_ok=True)
    redacted = sum(t.column("status").to_pylist().count("redacted") for t in plan.new_items)
    work.mark_done(ITEMS, {
        "partitions": len(plan.new_items), "items": rows, "by_source": dict(by_source), "redacted": redacted,
        "sources": plan.sources_digest, "fingerprints": [table_digest(t) for t in plan.new_items],
    })  # fmt: skip


def set_aside(work: WorkDir, step: StepPlan, parts: int) -> None:
    """Move a partition step's stale files to _previous (named by their fingerprint, so states
    from several interrupted rebuilds never overwrite each other)."""
    stale = set(step.recompute) | {p for p in work.done_parts(step.name) if p >= parts}
    if not stale:
        return
    recorded = {s["part"]: s.get("fingerprint") or "unknown" for s in work.read_stats(step.name)}
    target = work.root / PREVIOUS / step.name
    for part in sorted(stale):
        source = work.part_path(step.name, part)
        if source.exists():
            move_file(source, target / f"part-{part:05d}-{recorded.get(part, 'unknown')[:16]}.parquet")
        work.stats_path(step.name, part).unlink(missing_ok=True)
    work.success_path(step.name).unlink(missing_ok=True)


def index_previous(work: WorkDir, step: str, parts: int, item_ids: dict[int, list[str]]) -> None:
    """carry.json: for each partition, the set-aside files that hold rows of its items."""
    folder = work.root / PREVIOUS / step
    files = sorted(p for p in folder.glob("part-*.parquet")) if folder.exists() else []
    if not files:
        return
    where: dict[str, list[str]] = {}
    for path in files:
        for image_id in read_table(path, columns=["image_id"]).column("image_id").to_pylist():
            where.setdefault(image_id, []).append(path.name)
    carry = {}
    for part in range(parts):
        if part not in item_ids:
            item_ids[part] = read_columns(work.part_path(ITEMS, part), ["image_id"]).column("image_id").to_pylist()
        names = sorted({name for i in item_ids[part] for name in where.get(i, ())})
        if names:
            carry[str(part)] = names
    atomic_write_json(folder / "carry.json", carry)


def finish(work: WorkDir) -> None:
    remove_tree(work.root / PREVIOUS)


# ---------------------------------------------------------------- carrying rows


def row_digests(columns: list[str], view: pa.Table, live: list[int], salt: str) -> list[str]:
    """One digest per live row over the values a step sees of it (and the step's own inputs)."""
    present = [c for c in columns if c in view.column_names]
    values = {c: view.column(c).to_pylist() for c in present}
    out = []
    for i in live:
        h = hashlib.sha256(salt.encode())
        for c in present:
            v = values[c][i]
            h.update(c.encode() + b"\0")
            h.update(v if isinstance(v, bytes) else json.dumps(v, sort_keys=True, default=str).encode())
            h.update(b"\0")
        out.append(h.hexdigest()[:32])
    return out


def previous_rows(work: WorkDir, step: str, part: int) -> pa.Table | None:
    """Rows set aside for ``part``'s items (every column), or None."""
    folder = work.root / PREVIOUS / step
    carry = read_json(folder / "carry.json")
    names = (carry or {}).get(str(part))
    if not names:
        return None
    tables = [read_table(folder / n) for n in names if (folder / n).exists()]
    tables = [t for t in tables if DIGEST_COLUMN in t.column_names]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def carried(previous: pa.Table | None, ids: list[str], digests: list[str]) -> dict[int, int]:
    """live index -> row of ``previous`` that answered the same input."""
    if previous is None:
        return {}
    at = {(i, d): r for r, (i, d) in enumerate(zip(previous.column("image_id").to_pylist(), previous.column(DIGEST_COLUMN).to_pylist())) if d}
    return {j: at[(i, d)] for j, (i, d) in enumerate(zip(ids, digests)) if (i, d) in at}


def same_batch(previous: pa.Table, taken: dict[int, int], live: int) -> bool:
    """Every live row has its earlier answer, and the earlier partition had no other live row:
    the batch a batched model saw is the same, so its answers can be reused."""
    earlier_live = sum(1 for d in previous.column(DIGEST_COLUMN).to_pylist() if d)
    return len(taken) == live == earlier_live


# ---------------------------------------------------------------- small helpers


def read_marker(work: WorkDir, stage: str) -> dict | None:
    return read_json(work.success_path(stage))


def read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_WRITE)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def file_digest(path) -> str:
    from datakit.store import file_sha256

    return file_sha256(path)[0]

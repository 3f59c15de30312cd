"""Explain one item: every stage's decision on it, with the values behind each decision.

ITEM is an image_id, a URL (the listed locator or the final URL after redirects), a folder
source's file path (absolute, or relative to the source's root), or, failing those, a file name
that ends a locator. Each matching row of images.parquet is explained.

The per-stage story comes from the work folder (``_work/<stage>/part-*.parquet``: the columns
each stage set, in run order), which a build keeps. Without it, the columns of images.parquet
are grouped by the stage that sets them and the drop stage tells where the item left.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from datakit import registry, schema
from datakit.audit.folder import IDENTITIES, IMAGES, MEMBERS, SHARDS, AuditError, OutputFolder
from datakit.store import ITEMS, read_schema, read_table

DECISIONS = ("status", "drop_stage", "reason", "detail")
# where a column comes from when only images.parquet is there
COLUMN_STAGE = {
    **dict.fromkeys(["http_status", "attempts", "final_url", "content_type", "sha256", "bytes", "format", "width", "height", "mode"], "download"),
    **dict.fromkeys(["face_backend", "face_count", "face_box", "face_score", "face_area_fraction", "landmarks5", "landmarks68", "sharpness", "other_faces"], "detect"),
    **dict.fromkeys(["embedding", "embedding_model"], "embed"),
    **dict.fromkeys(["age", "age_source", "gender", "gender_source"], "attributes"),
    **dict.fromkeys(["duplicate_of", "phash", "phash_mirror"], "dedup"),
    **dict.fromkeys(["identity_id", "identity_distance", "review_flag"], "cluster"),
    **dict.fromkeys(["caption", "caption_source", "caption_detail"], "caption"),
    **dict.fromkeys(["shard", "key"], "shard"),
}  # fmt: skip
IDENTITY_COLUMNS = ("image_id", "source", "source_kind", "locator", "label", "extra")


def find_rows(folder: OutputFolder, item: str) -> list[dict]:
    table = folder.read(IMAGES)
    for column in ("image_id", "locator", "final_url"):
        hits = table.filter(pc.fill_null(pc.equal(table[column], item), False))
        if hits.num_rows:
            return hits.to_pylist()
    for source, locator in _as_folder_paths(folder, item):
        hits = table.filter(pc.and_(pc.equal(table["source"], source), pc.equal(table["locator"], locator)))
        if hits.num_rows:
            return hits.to_pylist()
    name = item.strip("/")
    if name:
        hits = table.filter(pc.fill_null(pc.ends_with(table["locator"], "/" + name), False))
        return hits.to_pylist()
    return []


def _as_folder_paths(folder: OutputFolder, item: str) -> list[tuple[str, str]]:
    """(source, locator) readings of ``item`` as a file under a folder source's root."""
    out = []
    path = Path(item).expanduser()
    for s in folder.sources:
        if s.get("kind") != "folder" or not s.get("root"):
            continue
        root = Path(s["root"])
        for candidate in (path, path.resolve()):
            if candidate.is_absolute():
                try:
                    out.append((s["name"], candidate.relative_to(root).as_posix()))
                except ValueError:
                    pass
    return out


def explain(folder: OutputFolder, item: str) -> list[dict]:
    folder.require(IMAGES)
    rows = find_rows(folder, item)
    if not rows:
        raise AuditError(f"{item!r}: no item of {folder.root / IMAGES} has this image_id, URL or path")
    return [explain_row(folder, row) for row in rows]


def explain_row(folder: OutputFolder, row: dict) -> dict:
    stages = stages_from_work(folder, row["image_id"]) or stages_from_manifest(folder, row)
    for s in stages:
        s["notes"] = [] if s["outcome"] == "not reached" else notes(folder, s["stage"], s["values"], row)
    return {
        "image_id": row["image_id"],
        "source": row["source"],
        "locator": row["locator"],
        "label": row["label"],
        "status": row["status"],
        "drop_stage": row["drop_stage"],
        "reason": row["reason"],
        "reason_meaning": schema.REASONS.get(row["reason"], ("", None))[1] if row["reason"] else None,
        "detail": row["detail"],
        "redacted_at": row.get("redacted_at"),
        "redaction_reason": row.get("redaction_reason"),
        "review_flag": row.get("review_flag"),
        "from_work_folder": bool(stages and stages[0].get("from_work")),
        "stages": stages,
    }


def _locate(folder: OutputFolder, image_id: str) -> tuple[int, int] | None:
    """(partition, row) of the item in the work folder's item files, or None."""
    items = folder.work.stage_dir(ITEMS)
    if not any(items.glob("part-*.parquet")):
        return None
    if not folder.is_local:  # duckdb reads local files only (without its s3 extension)
        for part in range(folder.work.num_parts()):
            ids = read_table(folder.work.part_path(ITEMS, part), columns=["image_id"]).column(0).to_pylist()
            if image_id in ids:
                return part, ids.index(image_id)
        return None
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    pattern = str(items / "part-*.parquet").replace("'", "''")
    hit = con.execute(
        f"SELECT filename, file_row_number FROM read_parquet('{pattern}', filename=true, file_row_number=true) WHERE image_id = ?",
        [image_id],
    ).fetchone()
    if hit is None:
        return None
    return int(Path(hit[0]).stem.split("-")[1]), int(hit[1])


def stages_from_work(folder: OutputFolder, image_id: str) -> list[dict]:
    where = _locate(folder, image_id)
    if where is None:
        return []
    part, index = where
    out, status_before = [], schema.KEPT
    for stage in registry.STEPS:
        path = folder.work.part_path(stage, part)
        if not path.is_file():
            continue
        file_schema = read_schema(path)
        names = file_schema.names
        bulky = [f.name for f in file_schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        plain = [c for c in names if c not in bulky]
        row = read_table(path, columns=plain).slice(index, 1).to_pylist()[0]
        if row.get("image_id") not in (None, image_id):
            raise AuditError(f"{path}: row {index} is {row.get('image_id')}, not {image_id}; the work folder is inconsistent")
        values = {k: v for k, v in row.items() if k not in DECISIONS and k not in ("image_id", "redacted_at", "redaction_reason")}
        for bulk in bulky:
            cell = read_table(path, columns=[bulk]).column(0)[index].as_py()
            values[bulk] = None if cell is None else f"{len(cell)} bytes in the work folder"
        out.append(_stage_entry(stage, status_before, row, values, from_work=True))
        status_before = row.get("status") or status_before
    return out


def _stage_entry(stage: str, before: str, row: dict, values: dict, from_work: bool = False) -> dict:
    after = row.get("status") or before
    if before != schema.KEPT:
        outcome = "not reached"
    elif after == schema.KEPT:
        outcome = "kept"
    elif after == schema.REDACTED:
        outcome = "redacted"
    else:
        outcome = "dropped"
    return {
        "stage": stage,
        "outcome": outcome,
        "reason": row.get("reason") if outcome == "dropped" else None,
        "detail": row.get("detail") if outcome == "dropped" else None,
        "values": {} if outcome == "not reached" else {k: v for k, v in values.items() if v is not None},
        "from_work": from_work,
    }


def stages_from_manifest(folder: OutputFolder, row: dict) -> list[dict]:
    declared = list((folder.recipe.get("stages") or {}).keys())
    stages = [s for s in registry.STAGES if s in declared] or list(registry.STAGES)
    out, before = [], schema.KEPT
    for stage in stages:
        values = {c: row.get(c) for c, s in COLUMN_STAGE.items() if s == stage}
        dropped_here = row["status"] == schema.DROPPED and row["drop_stage"] == stage
        status = schema.DROPPED if dropped_here else before
        fake = {"status": status, "reason": row["reason"] if dropped_here else None, "detail": row["detail"] if dropped_here else None}
        out.append(_stage_entry(stage, before, fake, values))
        before = status
    return out


# ---------------------------------------------------------------- the values behind decisions


def notes(folder: OutputFolder, stage: str, values: dict, row: dict) -> list[str]:
    fn = NOTES.get(stage)
    return fn(folder, values, row) if fn else []


def _filter_notes(folder: OutputFolder, v: dict, row: dict) -> list[str]:
    out = []
    area = v.get("face_area_fraction", row.get("face_area_fraction"))
    box = v.get("face_box", row.get("face_box"))
    sharp = v.get("sharpness", row.get("sharpness"))
    min_area = folder.setting("filter", "min_area_fraction", 0.10)
    min_px = folder.setting("filter", "min_face_px", 40.0)
    min_sharp = folder.setting("filter", "min_sharpness", 5.0)
    if area is not None:
        out.append(f"face area {area:.1%} of the image ({'>=' if area >= min_area else '<'} filter.min_area_fraction {min_area:.0%})")
    if box:
        side = min(box[2] - box[0], box[3] - box[1])
        out.append(f"face box {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f} px ({'>=' if side >= min_px else '<'} filter.min_face_px {min_px:g})")
    if sharp is not None:
        out.append(f"sharpness {sharp:.1f} ({'>=' if sharp >= min_sharp else '<'} filter.min_sharpness {min_sharp:g})")
    return out


def _dedup_notes(folder: OutputFolder, v: dict, row: dict) -> list[str]:
    twin = v.get("duplicate_of") or row.get("duplicate_of")
    if not twin:
        return []
    t = folder.read(IMAGES, columns=["image_id", "source", "locator", "status"])
    hit = t.filter(pc.equal(t["image_id"], twin)).to_pylist()
    if not hit:
        return [f"duplicate of {twin} (not in images.parquet)"]
    h = hit[0]
    return [f"duplicate of {twin}: {h['source']} {h['locator']} (status {h['status']})"]


def _cluster_notes(folder: OutputFolder, v: dict, row: dict) -> list[str]:
    out = []
    ident = v.get("identity_id") or row.get("identity_id")
    if v.get("identity_distance") is not None:
        out.append(f"embedding distance to its identity's centre: {v['identity_distance']:.3f}")
    if ident and folder.has(IDENTITIES):
        t = folder.read(IDENTITIES, columns=["identity_id", "names", "images"])
        hit = t.filter(pc.equal(t["identity_id"], ident)).to_pylist()
        if hit:
            out.append(f"identity {ident}: {', '.join(hit[0]['names'] or ['(no name)'])}; {hit[0]['images']} kept images")
        else:
            out.append(f"identity {ident} is not in identities.parquet (it kept no images)")
    if row.get("review_flag"):
        out.append(f"review flag: {row['review_flag']}")
    return out


def _shard_notes(folder: OutputFolder, v: dict, row: dict) -> list[str]:
    shard, key = v.get("shard") or row.get("shard"), v.get("key") or row.get("key")
    if not shard or not key:
        return []
    out = [f"sample {key} in {shard}"]
    if row["status"] == schema.REDACTED:
        out.append(f"redacted {row.get('redacted_at')}: {row.get('redaction_reason')}; removed from the shard")
        return out
    if folder.has(MEMBERS):
        m = folder.read(MEMBERS)
        hit = m.filter(pc.and_(pc.equal(m["shard"], shard), pc.equal(m["key"], key))).to_pylist()
        if hit:
            out.append("members: " + ", ".join(f"{h['member']} ({h['bytes']} bytes)" for h in hit))
        else:
            out.append("shard_members.parquet lists no member for it")
    if folder.has(SHARDS):
        s = folder.read(SHARDS)
        hit = s.filter(pc.equal(s["path"], shard)).to_pylist()
        if hit:
            out.append(f"shard sha256 {hit[0]['sha256'][:16]}..., {hit[0]['samples']} samples")
    return out


NOTES = {"filter": _filter_notes, "dedup": _dedup_notes, "cluster": _cluster_notes, "shard": _shard_notes}


# ---------------------------------------------------------------- text


def fmt_value(name: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        if name == "face_box" and len(value) == 4:
            return "[" + ", ".join(f"{x:.1f}" for x in value) + f"] ({value[2] - value[0]:.0f}x{value[3] - value[1]:.0f} px)"
        if name.startswith("landmarks"):
            return f"{len(value) // 2} points"
        if name == "embedding":
            norm = math.sqrt(sum(x * x for x in value))
            return f"{len(value)} floats, L2 norm {norm:.3f}"
        return str(value)
    text = str(value)
    return text if len(text) <= 90 else text[:87] + "..."


def render_text(explanations: list[dict]) -> str:
    lines = []
    for e in explanations:
        lines.append(f"{e['image_id']}  {e['source']}: {e['locator']}")
        lines.append(f"  label: {e['label']}")
        final = e["status"]
        if e["status"] == schema.DROPPED:
            final += f" at {e['drop_stage']}: {e['reason']} ({e['reason_meaning']})" + (f"; {e['detail']}" if e["detail"] else "")
        if e["status"] == schema.REDACTED:
            final += f" {e['redacted_at']}: {e['redaction_reason']}"
            if e["reason"]:
                final += f" (it had been dropped at {e['drop_stage']}: {e['reason']})"
        lines.append(f"  final: {final}")
        if not e["from_work_folder"]:
            lines.append("  (no work folder: values from images.parquet, grouped by the stage that sets them)")
        for s in e["stages"]:
            head = f"  {s['stage']:<11}{s['outcome']}"
            if s["outcome"] == "dropped":
                head += f": {s['reason']}" + (f" - {s['detail']}" if s["detail"] else "")
            lines.append(head)
            for k, v in s["values"].items():
                lines.append(f"      {k}: {fmt_value(k, v)}")
            for n in s["notes"]:
                lines.append(f"      > {n}")
        lines.append("")
    return "\n".join(lines)

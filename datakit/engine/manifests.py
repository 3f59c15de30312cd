"""The only writer of the build's manifests: images, identities, shards, shard_members, build.json.

``images.parquet`` is the work folder's last view of every row (bulk bytes left out), typed by
``datakit.schema``. ``shards.parquet`` and ``shard_members.parquet`` come from what the shard step
recorded about the tars it wrote; ``identities.parquet`` is derived from images.parquet (the
kept, sharded images of each identity), so a redaction recomputes it the same way.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import pyarrow as pa

from datakit import __version__, schema
from datakit.store import ITEMS, Location, WorkDir, atomic_write_json, atomic_write_table, file_sha256, read_table

IMAGES = "images.parquet"
IDENTITIES = "identities.parquet"
SHARDS = "shards.parquet"
MEMBERS = "shard_members.parquet"
BUILD = "build.json"
REMOVED = "removed.parquet"
HISTORY = "history"  # earlier states of images.parquet
SHARD_STEP = "shard"  # its work folder holds the shard and member tables
# build.json records the sha256 of each (``manifests``); ``datakit verify`` checks them
MANIFEST_FILES = (IMAGES, IDENTITIES, SHARDS, MEMBERS)


def write_images(work: WorkDir, steps: list[str]) -> pa.Table:
    """images.parquet; the one it replaces, when different, is kept as history/images-<time>.parquet
    (for ``datakit diff``)."""
    table = schema.conform(work.read_all(steps, columns=list(schema.IMAGE_COLUMNS)))
    path = work.output / IMAGES
    if path.exists():
        earlier = read_table(path)
        if not earlier.equals(table):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            atomic_write_table(work.output / HISTORY / f"images-{stamp}.parquet", earlier)
    atomic_write_table(path, table)
    return table


def write_shard_manifests(work: WorkDir, images: pa.Table) -> None:
    """shards.parquet and shard_members.parquet as the shard step recorded them; identities.parquet."""
    folder = work.stage_dir(SHARD_STEP)
    if not (folder / f"{SHARDS}").exists():
        return
    atomic_write_table(work.output / SHARDS, read_table(folder / SHARDS).cast(schema.SHARDS_SCHEMA))
    atomic_write_table(work.output / MEMBERS, read_table(folder / MEMBERS).cast(schema.SHARD_MEMBERS_SCHEMA))
    atomic_write_table(work.output / IDENTITIES, identities_table(images))


def write_removed(work: WorkDir, removed: list[dict], present: set[str]) -> None:
    """removed.parquet: the items earlier states listed and the sources no longer do (an item
    listed again leaves it). Not written while nothing was ever removed."""
    path = work.output / REMOVED
    rows = read_table(path).to_pylist() if path.exists() else []
    stamp = _iso(time.time())
    rows += [{**r, "status": "removed", "reason": "removed_from_source", "removed_at": stamp} for r in removed]
    if not rows:
        return
    latest = {r["image_id"]: r for r in rows if r["image_id"] not in present}
    table = pa.Table.from_pylist(sorted(latest.values(), key=lambda r: r["image_id"]), schema=schema.REMOVED_SCHEMA)
    atomic_write_table(path, table)


def identities_table(images: pa.Table, only: set[str] | None = None) -> pa.Table:
    """One row per identity with kept, sharded images (``only``: just those identities)."""
    cols = ["status", "identity_id", "label", "source", "gender", "age", "shard"]
    per: dict[str, list[dict]] = defaultdict(list)
    for r in images.select(cols).to_pylist():
        if r["status"] == schema.KEPT and r["identity_id"] and r["shard"] and (only is None or r["identity_id"] in only):
            per[r["identity_id"]].append(r)
    return pa.Table.from_pylist([{"identity_id": i, **schema.identity_row(per[i])} for i in sorted(per)], schema=schema.IDENTITIES_SCHEMA)


def write_table(output: Location, name: str, table: pa.Table) -> None:
    """A manifest rewritten in place (a redaction), atomically; build.json records its new hash."""
    atomic_write_table(output / name, table)
    record_manifest_hashes(output, (name,))


def manifest_hashes(output: Location, names=MANIFEST_FILES) -> dict[str, str]:
    """manifest file name -> sha256 of its bytes, for the manifests present."""
    return {name: file_sha256(output / name)[0] for name in names if (output / name).is_file()}


def record_manifest_hashes(output: Location, names=MANIFEST_FILES) -> None:
    """Bring build.json's ``manifests`` up to date with the files ``names`` (a redaction rewrote them)."""
    path = output / BUILD
    if not path.is_file():
        return
    build = json.loads(path.read_text())
    build["manifests"] = {**build.get("manifests", {}), **manifest_hashes(output, names)}
    atomic_write_json(path, build)


def stage_summaries(work: WorkDir, steps: list[str]) -> dict[str, dict]:
    stages = {}
    for name in steps:
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
    return stages


def write_build_json(work: WorkDir, recipe, result, started: float, models: dict) -> None:
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
        "models": models,
        "counts": {
            "items": result.items,
            "kept": result.kept,
            "dropped": result.items - result.kept,
            "dropped_by_reason": result.dropped_by_reason,
            "items_by_source": items_info.get("by_source", {}),
        },
        "stages": result.stages,
        "runs": runs,
        "manifests": manifest_hashes(work.output),
    }
    atomic_write_json(work.output / BUILD, build)


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

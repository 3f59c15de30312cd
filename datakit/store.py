"""The work folder of a build: where each stage's partitions live, atomic writes, markers.

Layout under ``OUTPUT/_work/``::

    recipe.json                   the resolved recipe of the latest run and its hash
    plan.json                     what each step depended on when the latest run planned it
    items/part-00000.parquet      the enumerated input items, fixed partitions
    items/_SUCCESS                partitions, counts, the sources' state and each partition's digest
    <stage>/part-00000.parquet    the columns that stage added or changed, same rows, same order
                                  (and each live row's input digest)
    <stage>/stats-00000.json      counts, seconds and the partition's fingerprint
    _previous/<stage>/            stale partitions a rebuild takes unchanged rows from (datakit.engine.reuse)
    <stage>/_SUCCESS              every partition of the stage is done

A file's presence is its completion marker: it is written under a temporary name in the same
folder and renamed into place, so a killed run leaves either the whole file or none (and a
stray temporary that the next run deletes). The view of partition *i* after stage *k* is the
items file with each stage's columns laid over it in order.

OUTPUT may also be an fsspec URL (``s3://bucket/corpus``, ``gs://...``): :func:`location`
turns it into a path object (universal_pathlib) with the same ``/``, ``exists`` and ``open``.
Object stores have no rename, but an object appears only when its upload completes, so there
a file is written whole from memory (one PUT) and the completion-marker rule still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, Union

import pyarrow as pa
import pyarrow.parquet as pq

ITEMS = "items"
TMP_PREFIX = ".tmp-"
REMOTE_READERS = 16  # partition views read at once from an object store


# A local folder (pathlib.Path) or an fsspec URL (upath.UPath): both have /, exists, open, glob.
Location = Union[Path, Any]
# Fixed writer settings so the same table gives the same bytes.
PARQUET_WRITE = dict(compression="zstd", write_statistics=True, store_schema=True)


def is_url(text: str) -> bool:
    """An fsspec URL (s3://, gs://, memory://); ``file://`` and plain paths are local folders."""
    return "://" in text and not text.startswith("file://")


def location(where, storage_options: dict | None = None) -> Location:
    """A local path, or a path object for an fsspec URL such as ``s3://bucket/prefix``.

    ``storage_options`` go to the fsspec file system (endpoint, region, credentials); what is
    not given comes from fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables and the
    backend's own configuration (``AWS_*`` variables, ``~/.aws``).
    """
    if hasattr(where, "protocol") and not isinstance(where, PurePath):
        return where  # already a location
    text = os.fspath(where)
    if not is_url(text):
        return Path(text.removeprefix("file://"))
    from upath import UPath

    options = {"use_listings_cache": False, **(storage_options or {})}  # other nodes write here too
    try:
        return UPath(text, **options)
    except (ImportError, ValueError) as error:
        raise ValueError(f"{text}: cannot open this output location ({error}); for s3:// install s3fs") from error


def is_local(path: Location) -> bool:
    return isinstance(path, PurePath)


def _parquet_source(path: Location) -> tuple:
    """(where, filesystem) for pyarrow: a file here, or a URL's path with its fsspec file system."""
    return (path, None) if is_local(path) else (path.path, path.fs)


def read_table(path: Location, **kwargs) -> pa.Table:
    where, fs = _parquet_source(path)
    return pq.read_table(where, filesystem=fs, **kwargs)


def read_schema(path: Location) -> pa.Schema:
    where, fs = _parquet_source(path)
    return pq.read_schema(where, filesystem=fs)


def read_metadata(path: Location) -> pq.FileMetaData:
    where, fs = _parquet_source(path)
    return pq.read_metadata(where, filesystem=fs)


def read_columns(path: Location, columns: list[str] | None) -> pa.Table:
    """A parquet file, or just those of ``columns`` it has (and always its image_id)."""
    if columns is None:
        return read_table(path)
    have = set(read_schema(path).names)
    return read_table(path, columns=[c for c in dict.fromkeys(["image_id", *columns]) if c in have])


def select_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """What ``read_columns`` reads of a file, from the table that was written to it."""
    if columns is None:
        return table
    return table.select([c for c in dict.fromkeys(["image_id", *columns]) if c in table.column_names])


def remove_tree(path: Location) -> None:
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def move_file(source: Location, dest: Location) -> None:
    """Move a file within the output (a rename here; copy and delete on an object store)."""
    if is_local(source):
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
    else:
        source.fs.mv(source.path, dest.path)


def publish_file(local: Path, dest: Location) -> None:
    """Move a finished local file to ``dest`` whole: a rename here, an upload to a URL."""
    if is_local(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, dest)
    else:
        dest.fs.put_file(str(local), dest.path)
        local.unlink()


def file_sha256(path: Location) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    path = Path(path) if isinstance(path, str) else path
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def atomic_write_bytes(path: Location, data: bytes) -> None:
    if not is_local(path):
        path.fs.pipe_file(path.path, data)  # one PUT: the object appears whole or not at all
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_table(path: Location, table: pa.Table) -> None:
    if not is_local(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **PARQUET_WRITE)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    pq.write_table(table, tmp, **PARQUET_WRITE)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Location, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class WorkDir:
    def __init__(self, output, storage_options: dict | None = None):
        self.output = location(output, storage_options)
        self.root = self.output / "_work"

    # paths
    def stage_dir(self, stage: str) -> Location:
        return self.root / stage

    def part_path(self, stage: str, part: int) -> Location:
        return self.stage_dir(stage) / f"part-{part:05d}.parquet"

    def stats_path(self, stage: str, part: int) -> Location:
        return self.stage_dir(stage) / f"stats-{part:05d}.json"

    def success_path(self, stage: str) -> Location:
        return self.stage_dir(stage) / "_SUCCESS"

    # state
    def is_done(self, stage: str) -> bool:
        return self.success_path(stage).exists()

    def part_done(self, stage: str, part: int) -> bool:
        return self.part_path(stage, part).exists() and self.stats_path(stage, part).exists()

    def done_parts(self, stage: str) -> set[int]:
        """Partitions of ``stage`` with both files written, from one listing of its folder
        (one request on an object store, where a check per file would be thousands)."""
        try:
            names = {p.name for p in self.stage_dir(stage).iterdir()}
        except (FileNotFoundError, NotADirectoryError):  # not started: no folder (no prefix)
            return set()
        return {
            int(n[5:-8]) for n in names
            if n.startswith("part-") and n.endswith(".parquet") and f"stats-{n[5:-8]}.json" in names
        }  # fmt: skip

    def num_parts(self) -> int:
        marker = self.success_path(ITEMS)
        if not marker.exists():
            raise FileNotFoundError(f"{self.root}: the items have not been enumerated yet")
        return int(json.loads(marker.read_text())["partitions"])

    def mark_done(self, stage: str, info: dict) -> None:
        atomic_write_json(self.success_path(stage), info)

    def remove_temporaries(self) -> int:
        """Delete what a killed run left half-written. Returns how many files went."""
        removed = 0
        if is_local(self.root) and self.root.exists():  # object stores never hold temporaries
            for p in self.root.rglob(f"{TMP_PREFIX}*"):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # writing
    def write_part(self, stage: str, part: int, table: pa.Table, stats: dict) -> None:
        # The table first, then the stats: a part counts as done only when both exist.
        atomic_write_table(self.part_path(stage, part), table)
        atomic_write_json(self.stats_path(stage, part), stats)

    def read_stats(self, stage: str) -> list[dict]:
        paths = sorted(self.stage_dir(stage).glob("stats-*.json"))
        if paths and not is_local(self.root):  # one batched, concurrent fetch, not a GET per file in turn
            blobs = self.root.fs.cat([p.path for p in paths])
            return [json.loads(blobs[p.path]) for p in paths]
        return [json.loads(p.read_text()) for p in paths]

    # reading
    def read_view(self, part: int, stages: list[str], columns: list[str] | None = None,
                  held: dict[str, pa.Table] | None = None) -> pa.Table:
        """Partition ``part`` as it stands after ``stages`` (in order). With ``columns``, each
        file gives only those columns (bulk bytes stay on disk unless asked for); a column no
        stage wrote is absent. ``held``: tables of this partition already in memory (a step's
        file as it was written, by name), used instead of reading their files again."""
        held = held if held is not None else {}
        table = read_columns(self.part_path(ITEMS, part), columns)
        for stage in stages:
            if stage in held:
                update = select_columns(held[stage], columns)
            else:
                update = read_columns(self.part_path(stage, part), columns)
            table = overlay(table, update, where=f"{stage} part {part}")
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        return table

    def iter_views(self, stages: list[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
        parts = range(self.num_parts())
        if is_local(self.root):
            for part in parts:
                yield self.read_view(part, stages, columns)
            return
        # An object store answers each small read after a round trip: keep several in flight,
        # and still yield the partitions in order.
        # (A bounded window: at most REMOTE_READERS views wait in memory.)
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=REMOTE_READERS) as pool:
            window: deque = deque()
            for part in parts:
                window.append(pool.submit(self.read_view, part, stages, columns))
                if len(window) >= REMOTE_READERS:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def read_all(self, stages: list[str], columns: list[str] | None = None) -> pa.Table:
        """Every partition after ``stages``; pass ``columns`` to leave bulk bytes on disk."""
        tables = list(self.iter_views(stages, columns))
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def overlay(base: pa.Table, update: pa.Table, where: str = "") -> pa.Table:
    """Lay ``update``'s columns over ``base`` (same rows, same order): replace or append."""
    if update.num_rows != base.num_rows:
        raise ValueError(f"{where}: stage output has {update.num_rows} rows, input had {base.num_rows}")
    if "image_id" in update.column_names and update.column("image_id") != base.column("image_id"):
        raise ValueError(f"{where}: stage output rows are not in the input's order")
    for name in update.column_names:
        if name == "image_id":
            continue
        col = update.column(name)
        if name in base.column_names:
            base = base.set_column(base.column_names.index(name), name, col)
        else:
            base = base.append_column(name, col)
    return base

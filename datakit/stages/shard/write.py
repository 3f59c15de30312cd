"""Write one shard: its samples' encoded members, in plan order, as a deterministic tar."""

from __future__ import annotations

import re
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa

from datakit.stages.shard import ENCODE_STEP, MEMBERS, SHARDS_DIR
from datakit.store import TMP_PREFIX, Location, WorkDir, file_sha256, is_local, publish_file, read_table
from portrait import shardio


def write_shard(output: Location, name: str, keys: list[str], parts: list[int]) -> dict:
    """Write one tar atomically; returns its path, size, sha256 and member rows."""
    work = WorkDir(output)
    pieces = [read_table(work.part_path(ENCODE_STEP, p), columns=["image_id", *(c for _, c in MEMBERS)],
                         filters=[("image_id", "in", keys)]) for p in parts]  # fmt: skip
    table = pa.concat_tables(pieces)
    row_of = {k: i for i, k in enumerate(table.column("image_id").to_pylist())}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise ValueError(f"shard {name}: {len(missing)} planned samples are not in the encoded files, e.g. {missing[0]}")
    columns = {col: table.column(col) for _, col in MEMBERS}
    folder = output / SHARDS_DIR
    if is_local(folder):  # the temporary sits beside the tar, so the rename is atomic
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    else:  # built on local disk, then uploaded whole
        tmp = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        members = _write_tar(tmp, name, keys, row_of, columns)
        digest, size = file_sha256(tmp)
        publish_file(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the upload failed
    return {"path": f"{SHARDS_DIR}/{name}", "bytes": size, "sha256": digest, "members": members}


def _write_tar(tmp: Path, name: str, keys: list[str], row_of: dict, columns: dict) -> list[dict]:
    with shardio.TarWriter(tmp) as tar:
        for key in keys:
            i = row_of[key]
            tar.write_sample(key, {suffix: columns[col][i].as_py() for suffix, col in MEMBERS})
    return [
        {"shard": f"{SHARDS_DIR}/{name}", "key": shardio.split_name(w.name)[0], "member": w.name, "bytes": w.bytes, "sha256": w.sha256}
        for w in tar.written
    ]


def remove_stale(folder: Location, keep: set[str]) -> None:
    """Shard files of an earlier, different plan (and temporaries) would mislead readers."""
    if not folder.exists():
        return
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) or (re.fullmatch(r"shard-\d+\.tar", p.name) and p.name not in keep):
            p.unlink()



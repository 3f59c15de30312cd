"""Shard stage: write the kept images as WebDataset tars under OUTPUT/shards/, grouped by identity.

A sample (key K = the image_id, stable across runs) is defined by ``portrait.sample``, which the
trainer reads with: K.jpg (the image, longest side at most ``image_size``, JPEG at
``jpeg_quality``), K.face.jpg (the embed stage's aligned crop), K.json (identity, source,
locator, box and landmarks in K.jpg's pixels, age, gender, caption, sizes), K.embedding.npy and
K.landmarks.npy. This stage decides what goes in (the row's values, scaled to the stored image);
``portrait.sample.encode`` makes and checks the bytes.

Three steps. *Encode*: each partition's kept samples are encoded once (one Ray task per
partition when Ray is running) into ``_work/shard/encoded/``, so their exact sizes are known.
*Plan*: identities sorted by id, samples by key, packed in order into shards bounded by
``max_samples`` and ``max_bytes`` (an identity never splits; one larger than a bound gets a
shard of its own), with bounds lowered when that gives at least ``min_shards`` shards (one
shard feeds one loader worker: ranks x workers need that many). *Write*: one task per shard
reads its samples with a pyarrow filter and writes the tar under a temporary name, then renames
it through ``portrait.shardio`` (fixed member headers: the same input and recipe give
byte-identical tars; keys are plain ``[0-9A-Za-z_-]`` words, so no member can leave the folder).

Then ``OUTPUT/shards.parquet``, ``OUTPUT/shard_members.parquet`` (every member's size and
sha256, for verification) and ``OUTPUT/identities.parquet`` are written atomically. The update
table gives each kept image its shard and key; an image that cannot be encoded here (no face
crop, bytes no longer decode) is dropped with ``stage_error`` and the reason in ``detail``.
"""

from __future__ import annotations

import io
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from datakit import schema
from portrait import sample, shardio
from portrait.decode import load_rgb
from portrait.ids import check_key
from datakit.stage import Stage, StageSettings
from datakit.store import (
    TMP_PREFIX, Location, WorkDir, atomic_write_table, file_sha256, is_local, publish_file, read_table, remove_tree,
)  # fmt: skip

SHARDS_DIR = "shards"
RECORD = shardio.RECORD
# member suffix -> column of the encoded table, in the order members are written
MEMBERS = tuple((suffix, suffix.replace(".", "_")) for suffix in sample.MEMBERS)
META_COLUMNS = [
    "image_id", "source", "label", "locator", "status", "drop_stage", "reason", "detail", "identity_id",
    "face_box", "landmarks5", "landmarks68", "embedding", "age", "gender", "caption", "width", "height",
]  # fmt: skip
# what the whole-corpus read needs (the per-partition encode reads META_COLUMNS and the bytes)
MANIFEST_COLUMNS = ["image_id", "source", "label", "status", "drop_stage", "reason", "detail", "identity_id", "age", "gender"]
ENCODED_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("identity_id", pa.string())]
    + [pa.field(col, pa.binary()) for _, col in MEMBERS]
    + [pa.field("error", pa.string())]
)


class Settings(StageSettings):
    image_size: int = Field(default=1024, ge=16, description="longest side of the stored image")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    max_samples: int = Field(default=1000, ge=1, description="samples per shard at most")
    max_bytes: int = Field(default=256 * 2**20, ge=RECORD, description="tar size per shard at most")
    min_shards: int = Field(default=8, ge=1, description="ranks x loader workers the shards should feed")
    parallel: bool = Field(default=True, description="one Ray task per partition / shard when Ray is running")


class ShardStage(Stage):
    name = "shard"
    kind = "global"
    Settings = Settings

    def process_global(self, work: WorkDir, upstream: list[str]) -> pa.Table:
        s: Settings = self.settings
        output = work.output
        meta = work.read_all(upstream, columns=MANIFEST_COLUMNS)
        check_identities(meta)
        meta = schema.conform(meta).select(MANIFEST_COLUMNS)  # a skipped stage's columns as nulls (no attributes: no age)
        encoded_dir = work.stage_dir(self.name) / "encoded"
        summaries = run_tasks(
            encode_partition,
            [(output, list(upstream), part, encoded_dir, s.image_size, s.jpeg_quality) for part in range(work.num_parts())],
            parallel=s.parallel, num_cpus=s.num_cpus, desc="shard: encode",
        )  # fmt: skip
        samples = pa.concat_tables([pa.Table.from_pylist(x, schema=SUMMARY_SCHEMA) for x in summaries])
        good = samples.filter(pa.compute.is_null(samples.column("error")))
        plan = plan_shards(good, s.max_samples, s.max_bytes, s.min_shards)
        shards_dir = output / SHARDS_DIR
        remove_stale(shards_dir, {name for name, _ in plan})
        written = run_tasks(
            write_shard,
            [(output, name, keys, _parts_of(good, keys), encoded_dir) for name, keys in plan],
            parallel=s.parallel, num_cpus=s.num_cpus, desc="shard: write",
        )  # fmt: skip
        shard_of = {k: name for name, keys in plan for k in keys}
        write_manifests(output, meta, plan, written, shard_of)
        remove_tree(encoded_dir)
        errors = dict(zip(samples.column("key").to_pylist(), samples.column("error").to_pylist()))
        return self.update_table(meta, shard_of, errors)

    def update_table(self, meta: pa.Table, shard_of: dict, errors: dict) -> pa.Table:
        ids = meta.column("image_id").to_pylist()
        status = meta.column("status").to_pylist()
        drop_stage, reason, detail = (meta.column(c).to_pylist() for c in ("drop_stage", "reason", "detail"))
        shard, key = [None] * len(ids), [None] * len(ids)
        for i, image in enumerate(ids):
            if status[i] != schema.KEPT:
                continue
            if image in shard_of:
                shard[i], key[i] = f"{SHARDS_DIR}/{shard_of[image]}", image
            else:
                status[i], drop_stage[i], reason[i] = schema.DROPPED, self.name, "stage_error"
                detail[i] = errors.get(image) or "no sample was written for this image"
        return pa.table(
            {
                "image_id": meta.column("image_id"),
                "status": pa.array(status, pa.string()),
                "drop_stage": pa.array(drop_stage, pa.string()),
                "reason": pa.array(reason, pa.string()),
                "detail": pa.array(detail, pa.string()),
                "shard": pa.array(shard, pa.string()),
                "key": pa.array(key, pa.string()),
            }
        )


def check_identities(meta: pa.Table) -> None:
    if "identity_id" not in meta.column_names:
        raise ValueError("shard: the rows have no identity_id column; run the cluster stage before shard")
    kept = pa.compute.equal(meta.column("status"), schema.KEPT)
    missing = pa.compute.sum(pa.compute.and_(kept, pa.compute.is_null(meta.column("identity_id")))).as_py() or 0
    if missing:
        raise ValueError(f"shard: {missing} kept rows have no identity_id; run the cluster stage before shard")


# ------------------------------------------------------------------ encode


SUMMARY_SCHEMA = pa.schema(
    [("key", pa.string()), ("identity_id", pa.string()), ("part", pa.int64()), ("tar_bytes", pa.int64()), ("error", pa.string())]
)


def encode_partition(output: Location, upstream: list[str], part: int, encoded_dir: Location, image_size: int, quality: int) -> list[dict]:
    """Encode the kept samples of one partition into encoded_dir; returns one summary per sample."""
    path = encoded_dir / f"part-{part:05d}.parquet"
    if not path.exists():  # a finished file from a killed run is reused
        work = WorkDir(output)
        view = work.read_view(part, upstream, columns=[*META_COLUMNS, "image_bytes", "face_crop"])
        kept = view.filter(pa.compute.equal(view.column("status"), schema.KEPT))
        rows = [encode_sample(row, image_size, quality) for row in kept.to_pylist()]
        atomic_write_table(path, pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA))
    table = read_table(path)
    cols = {c: table.column(c).to_pylist() for c in ("key", "identity_id", "error")}
    sizes = _tar_bytes(table)
    return [
        {"key": k, "identity_id": ident, "part": part, "tar_bytes": size, "error": err}
        for k, ident, err, size in zip(cols["key"], cols["identity_id"], cols["error"], sizes)
    ]


def _tar_bytes(table: pa.Table) -> list[int]:
    """Bytes each sample takes in a tar (shardio.member_tar_bytes summed over its members)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for _, col in MEMBERS:
        lengths = pa.compute.binary_length(table.column(col)).fill_null(-1).to_numpy().astype(np.int64)
        total += np.where(lengths >= 0, shardio.member_tar_bytes(lengths), 0)
    return total.tolist()


def encode_sample(row: dict, image_size: int, quality: int) -> dict:
    key = row["image_id"]
    out = {"key": key, "identity_id": row["identity_id"], "error": None}
    try:
        check_key(key)
        if not row.get("face_crop"):
            raise ValueError("no aligned face crop in the work folder")
        if not row.get("image_bytes"):
            raise ValueError("no image bytes in the work folder")
        image = load_rgb(row["image_bytes"])
        w, h = image.size
        scale = min(1.0, image_size / max(w, h))
        if scale < 1.0:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3)  # 3 = bicubic
        sx, sy = image.width / w, image.height / h
        box = _scaled(row.get("face_box"), sx, sy)
        lm5, lm68 = _scaled(row.get("landmarks5"), sx, sy), _scaled(row.get("landmarks68"), sx, sy)
        meta = {
            "image_id": key,
            "identity_id": row["identity_id"],
            "label": row.get("label"),
            "source": row.get("source"),
            "locator": row.get("locator"),
            "box": box,
            "landmarks5": _pairs(lm5),
            "landmarks68": _pairs(lm68),
            "age": None if row.get("age") is None else round(float(row["age"]), 2),
            "gender": row.get("gender"),
            "caption": row.get("caption"),
            "width": image.width,
            "height": image.height,
            "source_width": w,
            "source_height": h,
        }
        members = sample.encode(key, jpeg_bytes(image, quality), bytes(row["face_crop"]), meta, row.get("embedding"))
        out.update({column: members[suffix] for suffix, column in MEMBERS})
    except Exception as e:  # one bad sample never stops the shards; it is dropped with the reason
        out = {"key": key, "identity_id": row["identity_id"], "error": f"shard: {type(e).__name__}: {e}"}
    return out


def _scaled(values, sx: float, sy: float):
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 2) * np.array([sx, sy])
    return [round(float(v), 2) for v in arr.ravel()]


def _pairs(flat):
    return None if flat is None else [flat[i : i + 2] for i in range(0, len(flat), 2)]


def jpeg_bytes(image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings (no EXIF, no ICC, baseline, 4:2:0) so bytes depend on pixels only.
    image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue()


# ------------------------------------------------------------------ plan


def plan_shards(samples: pa.Table, max_samples: int, max_bytes: int, min_shards: int) -> list[tuple[str, list[str]]]:
    """[(shard file name, keys in order)]: identities sorted, never split, bounds kept."""
    by_identity: dict[str, list[tuple[str, int]]] = {}
    for key, ident, size in zip(*(samples.column(c).to_pylist() for c in ("key", "identity_id", "tar_bytes"))):
        by_identity.setdefault(ident, []).append((key, size))
    identities = [(ident, sorted(by_identity[ident])) for ident in sorted(by_identity)]
    counts = [len(items) for _, items in identities]
    sizes = [sum(size for _, size in items) for _, items in identities]
    groups = next_fit(counts, sizes, max_samples, max_bytes)
    want = min(min_shards, len(identities))
    if len(groups) < want:
        lo, hi = 1, max_samples  # the largest sample bound that still gives `want` shards
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(next_fit(counts, sizes, mid, max_bytes)) >= want:
                lo = mid
            else:
                hi = mid - 1
        groups = next_fit(counts, sizes, lo, max_bytes)
    width = max(5, len(str(len(groups) - 1)))
    return [
        (f"shard-{i:0{width}d}.tar", [key for g in group for key, _ in identities[g][1]])
        for i, group in enumerate(groups)
    ]


def next_fit(counts: list[int], sizes: list[int], max_samples: int, max_bytes: int) -> list[list[int]]:
    groups: list[list[int]] = []
    n = b = 0
    for i, (c, size) in enumerate(zip(counts, sizes)):
        if groups and groups[-1] and (n + c > max_samples or shardio.tar_size(b + size) > max_bytes):
            groups.append([])
            n = b = 0
        if not groups:
            groups.append([])
        groups[-1].append(i)
        n, b = n + c, b + size
    return groups


def _parts_of(samples: pa.Table, keys: list[str]) -> list[int]:
    wanted = set(keys)
    return sorted({p for k, p in zip(samples.column("key").to_pylist(), samples.column("part").to_pylist()) if k in wanted})


# ------------------------------------------------------------------ write


def write_shard(output: Location, name: str, keys: list[str], parts: list[int], encoded_dir: Location) -> dict:
    """Write one tar atomically; returns its size, sha256 and member rows."""
    pieces = [read_table(encoded_dir / f"part-{p:05d}.parquet", filters=[("key", "in", keys)]) for p in parts]
    table = pa.concat_tables(pieces)
    row_of = {k: i for i, k in enumerate(table.column("key").to_pylist())}
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


# ------------------------------------------------------------------ manifests


def write_manifests(output: Location, meta: pa.Table, plan, written: list[dict], shard_of: dict) -> None:
    rows = {r["image_id"]: r for r in meta.select(["image_id", "identity_id", "label", "source", "age", "gender"]).to_pylist()}
    shard_rows = []
    for (name, keys), w in zip(plan, written):
        shard_rows.append(
            {"path": w["path"], "bytes": w["bytes"], "sha256": w["sha256"], "samples": len(keys), "identities": len({rows[k]["identity_id"] for k in keys})}
        )
    atomic_write_table(output / "shards.parquet", pa.Table.from_pylist(shard_rows, schema=schema.SHARDS_SCHEMA))
    members = [m for w in written for m in w["members"]]
    atomic_write_table(output / "shard_members.parquet", pa.Table.from_pylist(members, schema=schema.SHARD_MEMBERS_SCHEMA))
    atomic_write_table(output / "identities.parquet", identities_table(rows, shard_of))


def identities_table(rows: dict[str, dict], shard_of: dict[str, str]) -> pa.Table:
    per: dict[str, list[dict]] = {}
    for image, shard in shard_of.items():
        per.setdefault(rows[image]["identity_id"], []).append({**rows[image], "shard": f"{SHARDS_DIR}/{shard}"})
    out = [{"identity_id": ident, **schema.identity_row(per[ident])} for ident in sorted(per)]
    return pa.Table.from_pylist(out, schema=schema.IDENTITIES_SCHEMA)


# ------------------------------------------------------------------ tasks


def run_tasks(fn, arg_list: list[tuple], parallel: bool, num_cpus: float, desc: str) -> list:
    """fn(*args) for each args: as Ray tasks when Ray is running and ``parallel``, else in turn."""
    from tqdm import tqdm

    if parallel and _ray_running():
        import ray

        remote = ray.remote(fn).options(num_cpus=num_cpus)
        refs = [remote.remote(*args) for args in arg_list]
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)
    return [fn(*args) for args in tqdm(arg_list, desc=desc, leave=False)]


def _ray_running() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False

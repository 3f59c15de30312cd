"""shard: plan the tars from each sample's identity and size, then write them (see datakit/stages/shard)."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from datakit import schema
from datakit.stage import Output, Stage, StageSettings, sequential_map
from datakit.stages.shard import RECORD, SHARDS_DIR
from datakit.stages.shard.write import remove_stale, write_shard
from datakit.store import location
from portrait import shardio


class Settings(StageSettings):
    image_size: int = Field(default=1024, ge=16, description="the stored image's side named by resize, at most")
    resize: Literal["long_side", "short_side"] = Field(
        default="long_side",
        description="long_side: the longest side is at most image_size; short_side: the shortest side is "
        "(set image_size to the training resolution so the trainer's square crops need no upsampling)",
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100)  # JPEG quality of an image re-encoded for the shard
    max_samples: int = Field(default=1000, ge=1, description="samples per shard at most")
    max_bytes: int = Field(default=256 * 2**20, ge=RECORD, description="tar size per shard at most")
    min_shards: int = Field(default=8, ge=1, description="ranks x loader workers the shards should feed")
    parallel: bool = Field(default=True, description="write the shards through the executor's workers, else one after another")


class ShardStage(Stage):
    name = "shard"
    kind = "global"
    Settings = Settings
    reads = ("identity_id", "tar_bytes", "part")
    adds = ("shard", "key")

    def process(self, rows: pa.Table) -> Output:
        s: Settings = self.settings
        check_identities(rows)
        samples = rows.rename_columns(["key" if c == "image_id" else c for c in rows.column_names])
        plan = plan_shards(samples, s.max_samples, s.max_bytes, s.min_shards)
        output = self.context.get("output") or location(self.context["output_dir"])
        remove_stale(output / SHARDS_DIR, {name for name, _ in plan})
        part_of = dict(zip(samples.column("key").to_pylist(), samples.column("part").to_pylist()))
        fan_out = self.fan_out if s.parallel else sequential_map
        written = fan_out(write_shard, [(output, name, keys, sorted({part_of[k] for k in keys})) for name, keys in plan])
        shard_of = {k: f"{SHARDS_DIR}/{name}" for name, keys in plan for k in keys}
        keys = rows.column("image_id").to_pylist()
        identity_of = dict(zip(keys, rows.column("identity_id").to_pylist()))
        shard_rows = [
            {"path": w["path"], "bytes": w["bytes"], "sha256": w["sha256"], "samples": len(ks), "identities": len({identity_of[k] for k in ks})}
            for (_, ks), w in zip(plan, written)
        ]  # fmt: skip
        return Output(
            values={"shard": [shard_of[k] for k in keys], "key": keys},
            tables={
                "shards": pa.Table.from_pylist(shard_rows, schema=schema.SHARDS_SCHEMA),
                "shard_members": pa.Table.from_pylist([m for w in written for m in w["members"]], schema=schema.SHARD_MEMBERS_SCHEMA),
            },
        )


def check_identities(rows: pa.Table) -> None:
    missing = pa.compute.sum(pa.compute.is_null(rows.column("identity_id"))).as_py() or 0
    if missing:
        raise ValueError(f"shard: {missing} kept rows have no identity_id; run the cluster stage before shard")


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



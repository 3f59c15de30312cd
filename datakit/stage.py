"""What a stage is, for the runner.

A *partition stage* maps one partition of items (a pyarrow Table with every column the earlier
stages produced) to the columns it adds or updates, one output row per input row, same order.
Rows that an earlier stage dropped come in too; a stage passes them through untouched (nulls in
its new columns). Anything a stage holds (a model, an HTTP session) is built once per worker in
``setup``.

A *global stage* sees every partition at once (exact duplicates across sources, identity
clustering, sharding) and returns the same kind of per-row update table, for all rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from datakit import schema


class StageSettings(BaseModel):
    """Settings every stage accepts; each stage's own ``Settings`` subclasses this.

    Ray resources of one worker: fractional ``num_cpus`` (whole-CPU actor pools deadlock the
    read tasks on a 2-CPU machine), ``num_gpus`` for cluster runs, ``concurrency`` workers
    (actors for model stages, parallel tasks otherwise; null lets Ray decide).
    """

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.5, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    concurrency: int | None = Field(default=None, ge=1)


class Stage:
    """Subclasses set ``name``, ``kind``, ``Settings`` and implement ``process``.

    Partition stages implement ``process(table)``; global stages implement
    ``process_global(work, upstream)`` where ``work`` is a ``datakit.store.WorkDir`` and
    ``upstream`` the stages before this one (``work.read_all(upstream, columns=[...])`` gives
    every row; ``work.iter_views`` streams partitions with their bulk bytes). It returns one
    update row per item, partitions in order, rows in partition order.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "partition"  # or "global"
    uses_model: ClassVar[bool] = False  # True: run as a Ray actor pool, setup() once per actor
    Settings: ClassVar[type[StageSettings]] = StageSettings

    def __init__(self, settings: Any, context: dict[str, Any]):
        self.settings = settings
        self.context = context  # output folder, recipe-wide settings (allow_private_addresses...)

    @classmethod
    def provenance(cls, settings: Any, context: dict[str, Any]) -> dict:
        """What build.json should record about this stage's models (names, files, sha256)."""
        return {}

    def setup(self) -> None:
        """Load models, open sessions. Called once per worker before the first partition."""

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def process_global(self, work, upstream: list[str]) -> pa.Table:
        raise NotImplementedError


def live_mask(table: pa.Table) -> list[bool]:
    """Which rows are still in play (not dropped by an earlier stage)."""
    return [s == schema.KEPT for s in table.column("status").to_pylist()]


def drop(row: dict, stage: str, reason: str, detail: str | None = None) -> dict:
    """Mark an output row dropped with a checked reason code."""
    row["status"] = schema.DROPPED
    row["drop_stage"] = stage
    row["reason"] = schema.check_reason(reason)
    row["detail"] = detail
    return row

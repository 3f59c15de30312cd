"""The stage contract: what a stage declares, what it receives and what it returns.

A stage only decides. It declares the columns it ``reads`` and the columns it ``adds``; the
engine (``datakit.engine``) selects the rows still in play, reads just those columns, calls
``process`` and settles the answer: it fills the added columns of rows dropped earlier, applies
"the first drop stands", types every column from ``datakit.schema`` and writes the result.

- A *partition stage* (``kind = "partition"``) gets one partition's live rows at a time.
- A *global stage* (``kind = "global"``) gets the live rows of every partition at once, and may
  read only narrow columns (never bulk bytes). Work it wants spread over workers goes through
  ``self.fan_out(fn, [args, ...])``, which the executor provides (Ray tasks, or in process).

``process(rows)`` returns an :class:`Output`: ``values`` (column -> one value per input row, in
input order) and ``drops`` (input row index -> ``(reason code, detail)``). Anything a stage holds
(a model, an HTTP session) is built once per worker in ``setup``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class StageSettings(BaseModel):
    """Settings every stage accepts; each stage's own ``Settings`` subclasses this.

    Ray resources of one worker: fractional ``num_cpus`` (whole-CPU actor pools deadlock the
    read tasks on a 2-CPU machine), ``num_gpus`` for cluster runs, ``concurrency`` workers
    (actors for model stages, parallel tasks otherwise; null lets Ray decide).
    """

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.5, gt=0)  # CPUs per worker; fractional (whole ones can deadlock a 2-CPU machine)
    num_gpus: float = Field(default=0.0, ge=0)  # GPUs per worker (cluster runs)
    concurrency: int | None = Field(default=None, ge=1)  # workers (actors or tasks); null: Ray decides


Drop = tuple[str, "str | None"]  # (reason code from schema.REASONS, plain-words detail)


@dataclass
class Output:
    """A stage's answer for the rows it was given."""

    values: dict[str, list] = field(default_factory=dict)  # column -> value per input row
    drops: dict[int, Drop] = field(default_factory=dict)  # input row -> (reason, detail)
    tables: dict[str, pa.Table] = field(default_factory=dict)  # global stages: extra manifests (shards, ...)


def sequential_map(fn: Callable, arg_list: list[tuple]) -> list:
    return [fn(*args) for args in arg_list]


class Stage:
    """Subclasses set ``name``, ``kind``, ``Settings``, ``reads``, ``adds`` and implement ``process``.

    ``step_of`` names the recipe stage a step belongs to when one recipe stage runs as several
    steps (``shard`` is encode, then plan and write); drops are recorded under that name.
    ``work_types`` types the work-folder-only columns a stage adds (bulk bytes and the like);
    every other column is typed by ``datakit.schema``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "partition"  # or "global"
    uses_model: ClassVar[bool] = False  # True: run as a Ray actor pool, setup() once per actor
    Settings: ClassVar[type[StageSettings]] = StageSettings
    step_of: ClassVar[str | None] = None
    reads: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()
    work_types: ClassVar[dict[str, pa.DataType]] = {}
    # False: a row's answer may depend on the rows processed with it (a model run on a batch,
    # whose floats vary with the batch); a rebuild then reuses its rows only when the
    # partition's live rows are all unchanged, never some of them.
    batch_invariant: ClassVar[bool] = True

    def __init__(self, settings: Any, context: dict[str, Any]):
        self.settings = settings
        self.context = context  # output folder, recipe-wide settings (source order, faces...)
        self.fan_out: Callable[[Callable, list[tuple]], list] = sequential_map

    @property
    def drop_stage(self) -> str:
        return self.step_of or self.name

    @classmethod
    def provenance(cls, settings: Any, context: dict[str, Any]) -> dict:
        """What build.json should record about this stage's models (names, files, sha256)."""
        return {}

    def setup(self) -> None:
        """Load models, open sessions. Called once per worker before the first partition."""

    def process(self, rows: pa.Table) -> Output:
        raise NotImplementedError


def column(table: pa.Table, name: str) -> list:
    """A column as a Python list; a column the table lacks reads as nulls."""
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def map_rows(table: pa.Table, adds: tuple[str, ...], decide: Callable[[dict, dict], Drop | None]) -> Output:
    """Run ``decide(row, out)`` on every row: it fills ``out`` with added values and returns a
    drop (reason, detail) or None. The per-row stages' whole ``process``."""
    values: dict[str, list] = {c: [None] * table.num_rows for c in adds}
    drops: dict[int, Drop] = {}
    for i, row in enumerate(table.to_pylist()):
        out: dict = {}
        verdict = decide(row, out)
        for name, value in out.items():
            values[name][i] = value
        if verdict is not None:
            drops[i] = verdict
    return Output(values, drops)

"""The engine's side of the stage contract, with small stages and no Ray: what a stage sees, how
its answer is settled (the first drop stands, typing, checks), and the plan of steps."""

from __future__ import annotations

import pyarrow as pa
import pytest

from datakit import registry, schema
from datakit.engine.local_executor import run_stages
from datakit.engine.plan import pools, segments, steps
from datakit.engine.settle import settle
from datakit.engine.steps import decide, live_rows
from datakit.recipe import load_recipe
from datakit.stage import Output, Stage, StageSettings
from datakit.store import ITEMS, WorkDir


def view(statuses: list[str], **columns) -> pa.Table:
    n = len(statuses)
    data = {
        "image_id": [f"id{i}" for i in range(n)],
        "status": statuses,
        "drop_stage": [None if s == schema.KEPT else "download" for s in statuses],
        "reason": [None if s == schema.KEPT else "http_error" for s in statuses],
        "detail": [None if s == schema.KEPT else "HTTP 404" for s in statuses],
    }
    data.update(columns)
    return pa.table(data)


class Sizer(Stage):
    """Reads width, adds face_count (= width // 10) and drops rows narrower than 50."""

    name = "detect"
    reads = ("width",)
    adds = ("face_count",)

    def __init__(self, settings=None, context=None):
        super().__init__(settings or StageSettings(), context or {})
        self.seen: list[list[str]] = []

    def process(self, rows: pa.Table) -> Output:
        self.seen.append(rows.column_names)
        widths = rows.column("width").to_pylist()
        drops = {i: ("image_too_small", f"{w} px") for i, w in enumerate(widths) if w < 50}
        return Output({"face_count": [w // 10 for w in widths]}, drops)


def test_a_stage_sees_only_live_rows_and_declared_columns_and_earlier_drops_stand():
    stage = Sizer()
    table = view(["kept", "dropped", "kept", "kept"], width=[100, 300, 20, 70], image_bytes=[b"x"] * 4)
    out = decide(stage, table).to_pylist()
    assert stage.seen == [["image_id", "width"]]  # no bulk bytes, no decision columns
    assert [r["status"] for r in out] == ["kept", "dropped", "dropped", "kept"]
    assert (out[1]["reason"], out[1]["drop_stage"], out[1]["face_count"]) == ("http_error", "download", None)
    assert (out[2]["reason"], out[2]["drop_stage"], out[2]["detail"]) == ("image_too_small", "detect", "20 px")
    assert [r["face_count"] for r in out] == [10, None, 2, 7]  # a row the stage drops keeps its values
    assert decide(stage, table).schema.field("face_count").type == schema.IMAGE_COLUMNS["face_count"][0]


def test_a_column_no_earlier_step_wrote_comes_as_typed_nulls():
    stage = Sizer()
    rows = live_rows(stage, view(["kept", "kept"]), [0, 1])
    assert rows.column("width").type == schema.IMAGE_COLUMNS["width"][0] and rows.column("width").null_count == 2


def test_settle_refuses_undeclared_columns_unknown_reasons_and_wrong_lengths():
    stage, table = Sizer(), view(["kept", "kept"], width=[100, 100])
    with pytest.raises(ValueError, match="does not declare"):
        settle(stage, table, [0, 1], Output({"face_count": [1, 2], "age": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="unknown reason code"):
        settle(stage, table, [0, 1], Output({"face_count": [1, 2]}, {0: ("vanished", None)}))
    with pytest.raises(ValueError, match="1 values of face_count for 2 rows"):
        settle(stage, table, [0, 1], Output({"face_count": [1]}))


class Fragile(Sizer):
    def process(self, rows: pa.Table) -> Output:
        if 13 in rows.column("width").to_pylist():
            raise RuntimeError("unlucky width")
        return super().process(rows)


def test_a_row_that_raises_is_dropped_alone_as_stage_error():
    out = decide(Fragile(), view(["kept", "kept", "kept"], width=[100, 13, 60])).to_pylist()
    assert [r["status"] for r in out] == ["kept", "dropped", "kept"]
    assert out[1]["reason"] == "stage_error" and "unlucky width" in out[1]["detail"]
    assert [out[0]["face_count"], out[2]["face_count"]] == [10, 6]


class Counter(Stage):
    """Global: counts the live rows and notes it in ``detail`` of each; reads a bulk column when asked."""

    name = "cluster"
    kind = "global"
    adds = ("detail",)

    def __init__(self, reads=("width",)):
        super().__init__(StageSettings(), {})
        self.reads = reads

    def process(self, rows: pa.Table) -> Output:
        return Output({"detail": [f"one of {rows.num_rows}"] * rows.num_rows})


def work_folder(tmp_path, parts: list[pa.Table]) -> WorkDir:
    work = WorkDir(tmp_path / "out")
    for i, t in enumerate(parts):
        work.write_part(ITEMS, i, t, {})
    work.mark_done(ITEMS, {"partitions": len(parts), "items": sum(t.num_rows for t in parts)})
    return work


def test_a_global_step_sees_live_rows_of_every_partition_and_never_bulk_bytes(tmp_path):
    parts = [view(["kept", "dropped"], width=[1, 2], image_bytes=[b"a", b"b"]), view(["kept"], width=[3], image_bytes=[b"c"])]
    work = work_folder(tmp_path, parts)
    done = run_stages(work, [Counter()], [])
    out = work.read_all(done, columns=["image_id", "detail"]).to_pylist()
    assert [r["detail"] for r in out] == ["one of 2", "HTTP 404", "one of 2"]
    assert [s["items_in"] for s in work.read_stats("cluster")] == [1, 1]
    with pytest.raises(ValueError, match="bulk columns"):
        run_stages(work_folder(tmp_path / "b", parts), [Counter(reads=("image_bytes",))], [])


def test_registry_steps_are_the_step_classes_in_order():
    names = [cls.name for stage in registry.STAGES for cls in registry.step_classes(stage)]
    assert names == registry.STEPS
    for stage in registry.STAGES:
        last = registry.step_classes(stage)[-1]
        assert last.name == stage, "the last step of a stage is named after it (it holds the settings)"


def test_the_demo_plan_runs_phash_before_dedup_and_shard_encode_before_shard(monkeypatch):
    monkeypatch.setenv("DATAKIT_DEMO_BASE_URL", "http://127.0.0.1:1/")
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml")
    plan = steps(recipe)
    assert [s.name for s in plan] == registry.STEPS
    assert [[s.name for s in seg] for seg in segments(plan)] == [
        ["download", "detect", "filter", "embed", "attributes", "phash"],
        ["dedup"],
        ["cluster"],
        ["caption", "shard_encode"],
        ["shard"],
    ]
    # a step shares its recipe stage's settings
    by_name = {s.name: s for s in plan}
    assert by_name["shard_encode"].settings is by_name["shard"].settings


def test_consecutive_cpu_steps_share_a_pool_and_a_gpu_or_sized_step_gets_its_own(monkeypatch):
    monkeypatch.setenv("DATAKIT_DEMO_BASE_URL", "http://127.0.0.1:1/")
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml")
    first = segments(steps(recipe))[0]

    def names(groups):
        return [[s.name for s in g] for g in groups]

    assert names(pools(first)) == [["download", "detect", "filter", "embed", "attributes", "phash"]]
    assert names(pools(first, fuse=False)) == [[s.name] for s in first]
    # a GPU step runs in its own pool, so the CPU steps around it (decoding, hashing) never hold the GPU
    gpu = recipe.model_copy(deep=True)
    gpu.stages["embed"]["num_gpus"] = 0.25
    assert names(pools(segments(steps(gpu))[0])) == [["download", "detect", "filter"], ["embed"], ["attributes", "phash"]]
    # a stage that sizes its own pool (here, downloads with many workers) keeps it
    sized = recipe.model_copy(deep=True)
    sized.stages["download"]["concurrency"] = 8
    assert names(pools(segments(steps(sized))[0])) == [["download"], ["detect", "filter", "embed", "attributes", "phash"]]


class Spreader(Stage):
    """Reads face_count (Sizer's), adds face_area_fraction = face_count / 100."""

    name = "filter"
    reads = ("face_count",)
    adds = ("face_area_fraction",)

    def __init__(self, settings=None, context=None):
        super().__init__(settings or StageSettings(), context or {})

    def process(self, rows: pa.Table) -> Output:
        return Output({"face_area_fraction": [c / 100 for c in rows.column("face_count").to_pylist()]})


def test_a_worker_hands_each_steps_table_to_the_next_instead_of_reading_its_file_back(tmp_path, monkeypatch):
    from datakit import store
    from datakit.engine import steps as run_steps
    from datakit.engine.ray_executor import PartitionWorker

    part = view(["kept", "dropped", "kept"], width=[100, 300, 20])
    apart = work_folder(tmp_path / "apart", [part])  # each step reads what the one before it wrote
    for i, stage in enumerate([Sizer(), Spreader()]):
        run_steps.run_partition(stage, apart, 0, ["detect"][:i])

    together = work_folder(tmp_path / "together", [part])
    reads = []
    real = store.read_columns
    monkeypatch.setattr(store, "read_columns", lambda path, columns: reads.append(path.parent.name) or real(path, columns))
    PartitionWorker([(Sizer, StageSettings()), (Spreader, StageSettings())], {}, [], together.output).run(0)
    assert reads == [ITEMS, ITEMS]  # the detect step's file was written, never read back
    for name in ("detect", "filter"):
        assert together.part_path(name, 0).read_bytes() == apart.part_path(name, 0).read_bytes()

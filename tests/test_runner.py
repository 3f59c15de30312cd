"""The Ray runner: every item accounted for, atomic checkpoints, resume after SIGTERM (after SIGKILL: test_rehearsal)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datakit import registry, schema
from datakit.engine import build as runner
from datakit.engine.steps import run_partition
from datakit.recipe import load_recipe
from datakit.stage import Output, Stage
from datakit.store import WorkDir

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "demo" / "folder"


class ExplodingStage(Stage):
    """Test-only stage: raises on any partition holding an item whose locator says 'explode'."""

    name = "detect"  # borrows a registered name so recipes validate
    reads = ("locator",)
    adds = ("face_count",)

    def process(self, rows):
        for locator in rows.column("locator").to_pylist():
            if "explode" in locator:
                raise RuntimeError(f"cannot handle {locator}")
        return Output({"face_count": [1] * rows.num_rows})


@pytest.fixture
def test_stages(monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setitem(registry.STAGES, "detect", [f"{__name__}:ExplodingStage"])


def make_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for person in ("Kofi_Annan", "Tony_Blair"):
        (root / person).mkdir(parents=True)
        for src in sorted((PHOTOS / person).iterdir())[:4]:
            (root / person / src.name).write_bytes(src.read_bytes())
    (root / "Tony_Blair" / "notes_explode.txt").write_text("not an image")
    (root / "Tony_Blair" / "empty.jpg").write_bytes(b"")
    return root


def recipe_file(tmp_path: Path, stages: dict, partition_size: int = 3, **source) -> Path:
    src = source or {"name": "photos", "kind": "folder", "root": str(make_folder(tmp_path))}
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "t", "output": str(tmp_path / "out"), "sources": [src], "ray": {"partition_size": partition_size}, "stages": stages}
        )
    )
    return path


def test_folder_build_accounts_for_every_item(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}}))
    result = runner.run(recipe, quiet=True, executor="local")
    images = pq.read_table(tmp_path / "out" / "images.parquet")
    assert images.schema.equals(schema.IMAGES_SCHEMA)
    rows = {r["locator"]: r for r in images.to_pylist()}
    assert len(rows) == images.num_rows == result.items == 10
    assert len(set(images.column("image_id").to_pylist())) == 10
    recorded = json.loads((tmp_path / "out" / "build.json").read_text())["manifests"]  # for datakit verify
    assert recorded["images.parquet"] == hashlib.sha256((tmp_path / "out" / "images.parquet").read_bytes()).hexdigest()
    assert rows["Tony_Blair/notes_explode.txt"]["reason"] == "undecodable"
    assert rows["Tony_Blair/empty.jpg"]["reason"] == "undecodable"
    photo = rows["Kofi_Annan/Kofi_Annan_0001.jpg"]
    assert photo["status"] == "kept" and photo["label"] == "Kofi_Annan"
    assert photo["sha256"] == hashlib.sha256((PHOTOS / "Kofi_Annan" / "Kofi_Annan_0001.jpg").read_bytes()).hexdigest()
    assert (photo["width"], photo["height"], photo["format"]) == (150, 150, "JPEG")
    build = json.loads((tmp_path / "out" / "build.json").read_text())
    assert build["recipe_hash"] == recipe.hash()
    assert build["counts"]["items"] == 10 and build["counts"]["kept"] == 8
    assert build["counts"]["dropped_by_reason"] == {"undecodable": 2}
    assert build["stages"]["download"]["items_in"] == 10 and build["stages"]["download"]["seconds"] >= 0
    assert "ray" in build["packages"] and "pyarrow" in build["packages"]


def test_a_failing_item_is_dropped_alone_and_earlier_drops_stand(tmp_path, ray_local, test_stages):
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}, "detect": {}}))
    runner.run(recipe, quiet=True)
    rows = {r["locator"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    # notes_explode.txt was already dropped by download (undecodable); its decision stands
    assert rows["Tony_Blair/notes_explode.txt"]["reason"] == "undecodable"
    assert rows["Tony_Blair/empty.jpg"]["status"] == "dropped"
    kept = [r for r in rows.values() if r["status"] == "kept"]
    assert len(kept) == 8 and all(r["face_count"] == 1 for r in kept)


def test_stage_error_reason_for_an_item_that_raises(tmp_path, ray_local, test_stages):
    root = make_folder(tmp_path)
    src = PHOTOS / "Kofi_Annan" / "Kofi_Annan_0005.jpg"
    (root / "Kofi_Annan" / "explode_me.jpg").write_bytes(src.read_bytes())
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}, "detect": {}}, name="photos", kind="folder", root=str(root)))
    runner.run(recipe, quiet=True)
    rows = {r["locator"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    bad = rows["Kofi_Annan/explode_me.jpg"]
    assert (bad["status"], bad["drop_stage"], bad["reason"]) == ("dropped", "detect", "stage_error")
    assert "cannot handle" in bad["detail"]
    # its partition neighbours were processed normally
    assert sum(1 for r in rows.values() if r["status"] == "kept") == 8


def test_second_run_skips_finished_work_and_a_changed_recipe_recomputes_that_stage(tmp_path, capsys, caplog):
    path = recipe_file(tmp_path, {"download": {}})
    runner.run(load_recipe(path), quiet=True, executor="local")
    work = WorkDir(tmp_path / "out")
    parts = sorted(work.stage_dir("download").glob("part-*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in parts]
    first = (tmp_path / "out" / "images.parquet").read_bytes()
    (work.stage_dir("download") / ".tmp-1234-part-00009.parquet").write_bytes(b"half")  # as a killed run leaves it
    with caplog.at_level("WARNING", logger="datakit"):
        runner.run(load_recipe(path), quiet=True, executor="local")
    assert "resuming: removed 1 half-written files" in caplog.text  # a repair is said, not silent
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    assert (tmp_path / "out" / "images.parquet").read_bytes() == first
    changed = yaml.safe_load(path.read_text())
    changed["stages"]["download"]["min_side"] = 200
    path.write_text(yaml.safe_dump(changed))
    plan = runner.plan_build(load_recipe(path))
    assert [(s.name, len(s.reuse), len(s.recompute)) for s in plan.steps] == [("download", 0, 4)]
    assert plan.steps[0].why == "settings changed: min_side 64 -> 200"
    from datakit.cli import main

    assert main(["run", str(path), "--plan"]) == 0  # prints the plan and changes nothing
    assert "download  reuse 0, recompute 4" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    result = runner.run(load_recipe(path), quiet=True, executor="local")
    assert result.dropped_by_reason.get("image_too_small") == 8
    # --restart discards the old build and builds the same
    again = runner.run(load_recipe(path), quiet=True, executor="local", restart=True)
    assert again.dropped_by_reason == result.dropped_by_reason


def test_manifest_opens_with_pyarrow_pandas_duckdb_and_datasets(tmp_path):
    runner.run(load_recipe(recipe_file(tmp_path, {"download": {}})), quiet=True, executor="local")
    path = tmp_path / "out" / "images.parquet"
    assert pq.read_table(path).num_rows == 10

    import pandas as pd

    df = pd.read_parquet(path)
    assert set(df["status"]) == {"kept", "dropped"}

    import duckdb

    counts = dict(duckdb.sql(f"select reason, count(*) from read_parquet('{path}') group by reason").fetchall())
    assert counts == {None: 8, "undecodable": 2}

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 10 and "image_id" in ds.column_names


def test_status_command(tmp_path, capsys):
    from datakit.cli import main

    runner.run(load_recipe(recipe_file(tmp_path, {"download": {}})), quiet=True, executor="local")
    assert main(["status", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "download" in out and "4/4" in out and "10 rows" in out
    assert main(["status", str(tmp_path / "nothing")]) == 2  # a user mistake: exit code 2 (issue 15)


def test_a_mistake_exits_2_in_plain_words_and_a_bug_says_it_is_one(tmp_path, capsys, monkeypatch):
    from datakit.cli import main

    path = recipe_file(tmp_path, {"download": {}})
    (tmp_path / "a_file").write_text("")
    assert main(["run", str(path), "--executor", "local", "--quiet", "--output", str(tmp_path / "a_file" / "out")]) == 2
    out = capsys.readouterr().out
    assert "Not a directory" in out and "a_file" in out and "Traceback" not in out

    def broken(*a, **kw):
        raise RuntimeError("an engine bug")

    monkeypatch.setattr(runner, "run", broken)
    assert main(["run", str(path), "--executor", "local", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an engine bug" in err and "This is a bug in datakit" in err


def test_run_prints_user_text_as_written_never_as_markup(tmp_path, capsys):
    """A recipe name with [/x] once crashed `run` (Rich markup); `sources[photos]` lost its name."""
    from datakit.cli import main

    path = recipe_file(tmp_path / "[photos]", {"download": {}})
    recipe = yaml.safe_load(path.read_text())
    recipe["name"] = "set [/x] one"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--executor", "local", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "building set [/x] one into" in out and str(tmp_path / "[photos]" / "out") in out
    listing = tmp_path / "list.csv"
    listing.write_text("link\nhttp://example.org/a.jpg\n")
    recipe["sources"] = [{"name": "photos", "kind": "urls", "path": str(listing)}]
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--executor", "local", "--quiet", "--restart"]) == 2
    assert "sources[photos].url_column" in capsys.readouterr().out


def url_list(tmp_path: Path, server, n: int) -> Path:
    photos = sorted(p.relative_to(PHOTOS).as_posix() for p in PHOTOS.rglob("*.jpg"))
    lines = ["url,name"]
    for i in range(n):
        if i % 5 == 0:  # a slow answer in every partition, so the kill lands mid-stage
            lines.append(f"{server.url('/fault/slow-headers')}?delay=0.4&i={i},")
        else:
            rel = photos[i % len(photos)]
            lines.append(f"{server.file_url(rel, copy=i)},{rel.split('/')[0]}")
    path = tmp_path / "urls.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_run(recipe: Path, output: Path, *args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "datakit", "run", str(recipe), "--output", str(output), "--quiet", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def wait_for_parts(work: WorkDir, stage: str, at_least: int, seconds: float = 120) -> int:
    deadline = time.time() + seconds
    done = 0
    while time.time() < deadline:
        done = len(list(work.stage_dir(stage).glob("part-*.parquet"))) if work.stage_dir(stage).exists() else 0
        if done >= at_least:
            break
        time.sleep(0.05)
    return done


@pytest.mark.timeout(400)
def test_sigterm_mid_download_then_rerun_gives_the_clean_manifest(tmp_path):
    """A scheduler's stop (SIGTERM) ends the run cleanly with exit 143 and a line saying how to go
    on, and the run started again finishes the build (a kill -9 of the driver is the two-node
    rehearsal's, tests/test_rehearsal.py)."""
    from devtools.photoserver import PhotoServer

    with PhotoServer(PHOTOS) as server:
        urls = url_list(tmp_path, server, 150)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "name": "kill",
                    "output": "unused",
                    "sources": [{"name": "web", "kind": "urls", "path": str(urls), "name_column": "name"}],
                    "ray": {"partition_size": 5, "num_cpus": 2},
                    "stages": {"download": {"allow_private_addresses": True, "timeout_s": 5}},
                }
            )
        )
        # the reference build runs in process (test_demo shows both executors build the same)
        clean = cli_run(recipe, tmp_path / "clean", "--executor", "local")
        assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()

        killed_out = tmp_path / "killed"
        work = WorkDir(killed_out)
        stopped = cli_run(recipe, killed_out)
        wait_for_parts(work, "download", 4)
        os.kill(stopped.pid, signal.SIGTERM)
        said = stopped.communicate(timeout=60)[0].decode()
        assert stopped.returncode == 143 and "stopped (SIGTERM): run the same command again" in said, said
        assert "Traceback" not in said, said
        first = len(list(work.stage_dir("download").glob("part-*.parquet")))
        assert 4 <= first < 30 and not work.is_done("download")

        assert not (killed_out / "images.parquet").exists()

        again = cli_run(recipe, killed_out)
        out = again.communicate(timeout=300)[0].decode()
        assert again.returncode == 0, out

    a = pq.read_table(tmp_path / "clean" / "images.parquet")
    b = pq.read_table(killed_out / "images.parquet")
    assert a.num_rows == b.num_rows == 150
    assert a.equals(b), "the resumed build's manifest differs from the clean build's"
    assert len(set(b.column("image_id").to_pylist())) == 150
    assert not list(work.root.rglob(".tmp-*"))


def test_a_write_that_fails_once_is_retried(tmp_path):
    """Through devtools.flakyfs, a file system whose next write fails while its flag file exists."""
    from datakit.stages.download import DownloadStage

    flag = tmp_path / "fail-once"
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}}), output=f"flaky://{tmp_path}/out")
    recipe.storage_options = {"fail_flag": str(flag)}
    work = WorkDir(recipe.output, recipe.storage_options)
    runner.prepare_output(work, recipe, restart=False)
    runner.enumerate_items(work, recipe)
    flag.write_text("x")
    stage = DownloadStage(recipe.stage_settings("download"), runner.stage_context(recipe, work))
    stage.setup()
    run_partition(stage, work, 0, [])
    assert not flag.exists(), "the injected failure did not fire"
    assert WorkDir(tmp_path / "out").part_done("download", 0)


def stall_recipe(tmp_path: Path, url_lines: list[str], **ray_settings) -> Path:
    """A URL-list recipe, two items per partition, whose requests may outlast the stall timeout."""
    (tmp_path / "urls.csv").write_text("\n".join(["url,name", *url_lines]) + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "stall", "output": str(tmp_path / "out"),
        "sources": [{"name": "web", "kind": "urls", "path": str(tmp_path / "urls.csv"), "name_column": "name"}],
        "ray": {"partition_size": 2, **ray_settings},
        "stages": {"download": {"allow_private_addresses": True, "timeout_s": 200, "retries": 0}},
    }))  # fmt: skip
    return path


@pytest.mark.timeout(300)
def test_a_hung_worker_is_noticed_and_its_partition_run_again(tmp_path, ray_local):
    """One request hangs for 120 s (its timeout is longer); the stall watch restarts the stage
    after 4 s without progress, the new worker's request is answered, the build completes."""
    from devtools.photoserver import PhotoServer

    photos = sorted(p.relative_to(PHOTOS).as_posix() for p in PHOTOS.rglob("*.jpg"))[:7]
    with PhotoServer(PHOTOS) as server:
        hang = server.url("/fault/stall-once/a") + "?delay=120"
        lines = [f"{hang},"] + [f"{server.file_url(rel)},{rel.split('/')[0]}" for rel in photos]
        path = stall_recipe(tmp_path, lines, stall_timeout=4, stall_restarts=2)
        started = time.monotonic()
        result = runner.run(load_recipe(path), quiet=True)
        hits = server.hits()
    assert result.stall_restarts == 1
    assert hits["/fault/stall-once/a"] == 2, "the hung request was not made again by a fresh worker"
    assert time.monotonic() - started < 100, "the build waited for the hung request instead of restarting"
    images = pq.read_table(tmp_path / "out" / "images.parquet")
    assert images.num_rows == 8 and set(images.column("status").to_pylist()) == {schema.KEPT}
    runs = json.loads((tmp_path / "out" / "build.json").read_text())["runs"]
    assert runs[-1]["stall_restarts"] == 1


def test_a_stage_that_never_finishes_stops_the_run_with_a_clear_error(tmp_path, ray_local):
    from devtools.photoserver import PhotoServer
    from datakit.watchdog import Stalled

    with PhotoServer(PHOTOS) as server:
        lines = [server.url(f"/fault/hold/{i}") + "?delay=60," for i in range(2)]
        path = stall_recipe(tmp_path, lines, stall_timeout=3, stall_restarts=1)
        with pytest.raises(Stalled, match=r"stage download: no partition finished within 3 s, 2 times"):
            runner.run(load_recipe(path), quiet=True)
        assert server.hits()["/fault/hold/0"] == 2


def test_a_rebuild_does_not_fetch_what_was_redacted(tmp_path, ray_local):
    """redact, then `run --restart` (or a new build listing the log): the item stays redacted
    and its URL is not requested again."""
    from datakit.audit.folder import OutputFolder
    from datakit.audit.redact import redact
    from devtools.photoserver import PhotoServer

    photos = sorted(p.relative_to(PHOTOS).as_posix() for p in PHOTOS.rglob("*.jpg"))[:6]
    with PhotoServer(PHOTOS) as server:
        urls = [f"{server.file_url(rel)},{rel.split('/')[0]}" for rel in photos]
        path = stall_recipe(tmp_path, urls)
        runner.run(load_recipe(path), quiet=True)
        out = tmp_path / "out"
        victim = pq.read_table(out / "images.parquet").to_pylist()[2]
        redact(OutputFolder(out), "subject asked to be removed", image_ids=[victim["image_id"]])

        runner.run(load_recipe(path), restart=True, quiet=True)
        other = yaml.safe_load(path.read_text()) | {"output": str(tmp_path / "other"), "redactions": [str(out / "redactions.jsonl")]}
        path.write_text(yaml.safe_dump(other))
        runner.run(load_recipe(path), quiet=True)
        hits = server.hits()
    path_of = "/files/" + photos[2]
    assert hits[path_of] == 1, "a redacted item was fetched again"
    assert all(hits["/files/" + rel] == 3 for i, rel in enumerate(photos) if i != 2)
    for folder in (out, tmp_path / "other"):
        rows = {r["image_id"]: r for r in pq.read_table(folder / "images.parquet").to_pylist()}
        row = rows[victim["image_id"]]
        assert row["status"] == schema.REDACTED and row["redaction_reason"] == "subject asked to be removed"
        assert row["redacted_at"] and row["sha256"] is None and "not fetched again" in row["detail"]
        assert sum(r["status"] == schema.KEPT for r in rows.values()) == 5
        build = json.loads((folder / "build.json").read_text())
        assert build["counts"]["dropped_by_reason"] == {"redacted": 1}


def test_a_file_name_that_is_not_utf8_is_built_like_any_other(tmp_path):
    """`bad\\xff.jpg` once aborted the whole build (UnicodeEncodeError hashing its id)."""
    root = make_folder(tmp_path)
    photo = sorted((PHOTOS / "Kofi_Annan").iterdir())[0].read_bytes()
    with open(os.fsencode(root / "Kofi_Annan") + b"/bad\xff.jpg", "wb") as f:
        f.write(photo)
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}}, name="photos", kind="folder", root=str(root)))
    result = runner.run(recipe, quiet=True, executor="local")
    rows = {r["locator"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    assert result.items == len(rows) == 11
    odd = rows["Kofi_Annan/bad\\xff.jpg"]  # readable: the byte written as \xff
    assert odd["status"] == "kept" and odd["label"] == "Kofi_Annan"
    assert odd["sha256"] == hashlib.sha256(photo).hexdigest()  # the real file was read
    assert odd["image_id"] == schema.image_id("photos", "Kofi_Annan/bad\\xff.jpg")  # the id rule holds for the row


def test_a_link_out_of_the_root_is_a_row_and_is_never_read(tmp_path, capsys):
    """A folder source once read /etc/passwd through a link and put its first bytes in `detail`."""
    root = make_folder(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret")
    (root / "Kofi_Annan" / "passwd.jpg").symlink_to(secret)
    (root / ".cache").mkdir()
    recipe = load_recipe(recipe_file(tmp_path, {"download": {}}, name="photos", kind="folder", root=str(root)))
    result = runner.run(recipe, quiet=True, executor="local")
    rows = {r["locator"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    assert result.items == len(rows) == 12
    assert (rows["Kofi_Annan/passwd.jpg"]["reason"], rows[".cache/"]["reason"]) == ("outside_root", "hidden_file")
    assert rows["Kofi_Annan/passwd.jpg"]["sha256"] is None and rows["Kofi_Annan/passwd.jpg"]["drop_stage"] == "sources"
    assert "root:x" not in json.dumps(list(rows.values()), default=str)
    assert result.dropped_by_reason["outside_root"] == 1
    from datakit.cli import main

    assert main(["explain", str(tmp_path / "out"), "Kofi_Annan/passwd.jpg"]) == 0
    explained = capsys.readouterr().out
    assert "final: dropped at sources: outside_root" in explained and "download   not reached" in explained


SESSION_PROBE = """
import json, sys
from pathlib import Path
import ray
import ray._private.node as node_module
from datakit.engine.ray_executor import RayExecutor

seen = {}
kill = node_module.Node._kill_process_impl
def spy(self, process_type, **kwargs):
    for info in self.all_processes.get(process_type, []):
        seen[process_type] = info.process.poll() is None  # alive when ray.shutdown comes to it
    kill(self, process_type, **kwargs)
node_module.Node._kill_process_impl = spy

executor = RayExecutor()
with executor.session(None, 1, Path(sys.argv[1])):
    monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
    ray.get(ray.remote(lambda: 1).remote())
print(json.dumps({"initialized": ray.is_initialized(), "alive_when_reached": seen, "monitor_rc": monitor.returncode}))
"""


def test_a_session_stops_the_ray_it_started_and_does_not_wait_on_the_autoscaler_monitor(tmp_path):
    """Ray's shutdown gives each process a second to exit after SIGTERM, and its autoscaler
    monitor never takes it: the session kills the monitor first, then shuts Ray down itself
    before the build returns (not in Ray's exit hook)."""
    done = subprocess.run([sys.executable, "-c", SESSION_PROBE, str(tmp_path / "logs")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["initialized"] is False
    assert probe["alive_when_reached"]["raylet"] is True  # the spy sees what Ray's shutdown meets
    assert probe["alive_when_reached"]["monitor"] is False
    assert probe["monitor_rc"] == -signal.SIGKILL
    assert (tmp_path / "logs" / "raylet.out").exists()  # the logs were saved before the shutdown


def test_both_entry_points_freeze_what_is_alive_before_the_interpreter_exits(monkeypatch):
    """The ``datakit`` command and ``python -m datakit`` return main's code after gc.freeze(), so
    the interpreter's exit does not collect the object graphs of Ray, pandas and pyarrow
    (bench-faces counts that time)."""
    from importlib.metadata import entry_points

    import datakit.cli

    monkeypatch.setattr(datakit.cli, "main", lambda: 3)
    (command,) = entry_points(group="console_scripts", name="datakit")
    gc.unfreeze()
    try:
        assert command.load()() == 3
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        with pytest.raises(SystemExit) as exited:
            runpy.run_module("datakit", run_name="__main__")
        assert exited.value.code == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()

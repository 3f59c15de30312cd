"""Builds written to and read from object storage: a real S3-compatible server (moto's server
mode) on 127.0.0.1, reached through fsspec/s3fs exactly as a cluster would reach S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datakit import schema
from datakit.engine import build as runner
from datakit.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "demo" / "folder"
PEOPLE = ("Colin_Powell", "Kofi_Annan", "Tony_Blair")
BUCKET = "corpus"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing-secret"}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    yield options
    server.stop()


def fs_of(options):
    import s3fs

    return s3fs.S3FileSystem(**options, use_listings_cache=False)


def env_for(options) -> dict:
    """What a CLI user sets so that fsspec finds the store (no storage options on the command line)."""
    return {
        **os.environ,
        "FSSPEC_S3_ENDPOINT_URL": options["endpoint_url"],
        "FSSPEC_S3_KEY": options["key"],
        "FSSPEC_S3_SECRET": options["secret"],
    }


def write_recipe(tmp_path: Path, output: str, storage_options: dict | None = None, stages: dict | None = None) -> Path:
    root = tmp_path / "photos"
    if not root.exists():
        for person in PEOPLE:
            (root / person).mkdir(parents=True)
            for src in sorted((PHOTOS / person).iterdir())[:6]:
                (root / person / src.name).write_bytes(src.read_bytes())
    raw = {
        "name": "object-store",
        "output": output,
        "sources": [{"name": "photos", "kind": "folder", "root": str(root)}],
        "faces": {"backend": "dlib"},
        "ray": {"partition_size": 5},
        "stages": {
            "download": {}, "detect": {}, "filter": {}, "embed": {},
            "cluster": {"min_images": 3}, "shard": {"image_size": 256, "max_samples": 6, "min_shards": 2},
        },
    }  # fmt: skip
    for name, settings in (stages or {}).items():
        raw["stages"][name].update(settings)
    if storage_options is not None:
        raw["storage_options"] = storage_options
    path = tmp_path / f"recipe-{hashlib.sha1(output.encode()).hexdigest()[:8]}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def builds(s3, tmp_path_factory, ray_local):
    """The same recipe built into a local folder and into s3://corpus/builds/small."""
    tmp = tmp_path_factory.mktemp("objstore")
    local = tmp / "local-out"
    # the reference build runs in process (test_demo shows both executors build the same)
    runner.run(load_recipe(write_recipe(tmp, str(local))), quiet=True, executor="local")
    url = f"s3://{BUCKET}/builds/small"
    result = runner.run(load_recipe(write_recipe(tmp, url, s3)), quiet=True)
    return local, url, result, tmp


def read_remote(options, key: str):
    with fs_of(options).open(f"{BUCKET}/builds/small/{key}", "rb") as f:
        return pq.read_table(f)


def test_build_to_s3_writes_the_same_manifests_and_shards_as_a_local_build(s3, builds):
    local, url, result, tmp = builds
    fs = fs_of(s3)
    keys = {p.split("/builds/small/", 1)[1] for p in fs.find(f"{BUCKET}/builds/small")}
    for name in ("images.parquet", "identities.parquet", "shards.parquet", "shard_members.parquet", "build.json"):
        assert name in keys, f"{name} was not written to the bucket"
    assert "_work/recipe.json" in keys and "_work/download/_SUCCESS" in keys
    assert not any(".tmp-" in k for k in keys)

    local_images = pq.read_table(local / "images.parquet")
    remote_images = read_remote(s3, "images.parquet")
    assert remote_images.schema.equals(schema.IMAGES_SCHEMA)
    assert remote_images.equals(local_images), "the S3 build's images.parquet differs from the local build's"
    assert result.items == 18 and result.kept == local_images.column("status").to_pylist().count("kept") > 0

    local_shards = pq.read_table(local / "shards.parquet").to_pylist()
    remote_shards = read_remote(s3, "shards.parquet").to_pylist()
    assert len(remote_shards) >= 2 and remote_shards == local_shards
    for row in remote_shards:
        data = fs.cat_file(f"{BUCKET}/builds/small/{row['path']}")
        assert hashlib.sha256(data).hexdigest() == row["sha256"] == hashlib.sha256((local / row["path"]).read_bytes()).hexdigest()


def test_storage_options_stay_out_of_the_recorded_recipe(s3, builds):
    build = fs_of(s3).cat_file(f"{BUCKET}/builds/small/build.json").decode()
    recorded = fs_of(s3).cat_file(f"{BUCKET}/builds/small/_work/recipe.json").decode()
    for text in (build, recorded):
        assert s3["secret"] not in text and "storage_options" not in text
    assert json.loads(build)["recipe"]["output"] == f"s3://{BUCKET}/builds/small"


def test_a_second_run_on_s3_resumes_and_changes_nothing(s3, builds):
    local, url, result, tmp = builds
    fs = fs_of(s3)
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/builds/small/shards")}
    again = runner.run(load_recipe(write_recipe(tmp, url, s3)), quiet=True)
    assert (again.items, again.kept) == (result.items, result.kept)
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/builds/small/shards")} == before


def test_restart_on_s3_discards_the_work_folder_and_builds_the_same_again(s3, builds):
    local, url, result, tmp = builds
    fs = fs_of(s3)
    stray = f"{BUCKET}/builds/small/_work/download/part-09999.parquet"
    fs.pipe_file(stray, b"left by an older build")
    again = runner.run(load_recipe(write_recipe(tmp, url, s3)), restart=True, quiet=True, executor="local")
    assert not fs.exists(stray), "--restart left the old work folder behind"
    assert again.kept == result.kept
    assert read_remote(s3, "images.parquet").equals(pq.read_table(local / "images.parquet"))


def test_cli_status_verify_and_stats_read_the_build_from_s3(s3, builds):
    local, url, result, tmp = builds

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "datakit", *args], cwd=REPO, env=env_for(s3), capture_output=True, text=True, timeout=300)

    status = cli("status", url)
    assert status.returncode == 0 and "build complete" in status.stdout, status.stdout + status.stderr
    verify = cli("verify", url, "--quiet")
    assert verify.returncode == 0 and "ok:" in verify.stdout, verify.stdout + verify.stderr
    stats = cli("stats", url, "--json", "--sheets", "1")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["kept"] == result.kept
    assert fs_of(s3).exists(f"{BUCKET}/builds/small/audit/table6.csv")


def test_verify_on_s3_finds_a_damaged_shard(s3, builds):
    local, url, result, tmp = builds
    fs = fs_of(s3)
    victim = f"{BUCKET}/builds/small/shards/shard-00001.tar"
    original = fs.cat_file(victim)
    fs.pipe_file(victim, original[:-10240])  # the last record gone
    try:
        proc = subprocess.run([sys.executable, "-m", "datakit", "verify", url, "--quiet"], cwd=REPO, env=env_for(s3),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 1 and "truncated_shard" in proc.stdout, proc.stdout + proc.stderr
    finally:
        fs.pipe_file(victim, original)


def test_trainer_reads_the_shards_from_s3(s3, builds, monkeypatch):
    from trainer import data

    local, url, result, tmp = builds
    for key, value in (("endpoint_url", s3["endpoint_url"]), ("key", s3["key"]), ("secret", s3["secret"])):
        monkeypatch.setenv(f"FSSPEC_S3_{key.upper()}", value)
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    urls = data.list_shards(f"{url}/shards")
    assert urls == [f"{url}/shards/{Path(u).name}" for u in data.list_shards(local / "shards")]
    remote = [(r.key, r.identity_id) for r in data._sequential_records(urls, data.Stats())]
    here = [(r.key, r.identity_id) for r in data._sequential_records(data.list_shards(local / "shards"), data.Stats())]
    assert remote == here and len(remote) == result.kept


def test_an_unknown_url_scheme_is_a_clear_recipe_level_error(tmp_path):
    from datakit.store import location

    with pytest.raises(ValueError, match="nosuchfs://bucket/x: cannot open this output location"):
        location("nosuchfs://bucket/x")


def test_redact_refuses_an_object_store_build_with_a_clear_message(s3, builds):
    local, url, result, tmp = builds
    proc = subprocess.run([sys.executable, "-m", "datakit", "redact", url, "--identity", "Kofi_Annan", "--reason", "takedown"],
                          cwd=REPO, env=env_for(s3), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "object store" in (proc.stdout + proc.stderr) and url in (proc.stdout + proc.stderr)
    assert read_remote(s3, "images.parquet").equals(pq.read_table(local / "images.parquet"))


@pytest.mark.timeout(600)
def test_a_two_node_cluster_builds_into_s3(s3, builds):
    """`datakit run --address` on a real two-node Ray cluster (devtools.rehearsal's), output on S3:
    workers on both nodes write partitions to the bucket; the result equals the local build."""
    from devtools.rehearsal.cluster import ray_cluster

    local, url, result, tmp = builds
    target = f"s3://{BUCKET}/builds/two-node"
    # detect with a pool of its own: partitions pass between three actor pools (download,
    # detect, filter+embed) instead of the one a default recipe fuses them into
    recipe = write_recipe(tmp, target, s3, {"detect": {"concurrency": 2}})
    with ray_cluster() as cluster:
        proc = subprocess.run([sys.executable, "-m", "datakit", "run", str(recipe), "--address", cluster.address, "--quiet"],
                              cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=500)  # fmt: skip
        worker_logs = " ".join(p.read_text(errors="replace") for p in cluster.worker.temp_dir.rglob("worker-*.out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # a partition lane's actor is a class named after its steps ("download+detect+..."), a global step a task
    assert any(f":actor_name:{pool}\n" in worker_logs for pool in ("download", "detect", "filter+embed")) \
        or "_run_global_task" in worker_logs, "no datakit stage ran on the second node"
    with fs_of(s3).open(f"{BUCKET}/builds/two-node/images.parquet", "rb") as f:
        two_node = pq.read_table(f)
    local_images = pq.read_table(local / "images.parquet")
    assert two_node.equals(local_images), "the two-node S3 build's images.parquet differs from the local build's"
    shards = {r["path"]: r["sha256"] for r in read_remote(s3, "shards.parquet").to_pylist()}
    with fs_of(s3).open(f"{BUCKET}/builds/two-node/shards.parquet", "rb") as f:
        assert {r["path"]: r["sha256"] for r in pq.read_table(f).to_pylist()} == shards


def test_remote_work_folder_reads_many_partitions_in_order():
    """More partitions than the concurrent-read window: views come back in partition order and
    every stats file is read (fsspec's in-memory file system stands in for a bucket here)."""
    import pyarrow as pa

    from datakit.store import ITEMS, REMOTE_READERS, WorkDir, atomic_write_table

    work = WorkDir(f"memory://datakit-test-{os.getpid()}/build")
    parts = 3 * REMOTE_READERS + 5
    for part in range(parts):
        ids = [f"{part:03d}-{i}" for i in range(3)]
        atomic_write_table(work.part_path(ITEMS, part), pa.table({"image_id": ids, "status": ["kept"] * 3}))
        work.write_part("download", part, pa.table({"image_id": ids, "width": [part] * 3}), {"part": part})
    work.mark_done(ITEMS, {"partitions": parts})
    table = work.read_all(["download"])
    assert table.column("image_id").to_pylist() == [f"{p:03d}-{i}" for p in range(parts) for i in range(3)]
    assert table.column("width").to_pylist() == [p for p in range(parts) for _ in range(3)]
    assert [s["part"] for s in work.read_stats("download")] == list(range(parts))
    assert work.done_parts("download") == set(range(parts))


def test_face_settings_are_found_beside_shards_on_object_storage(s3, monkeypatch):
    """The trainer's shards may be an s3:// URL: the build.json beside them gives the face settings."""
    import fsspec

    from portrait.faces.reader import build_file_for, read_config

    monkeypatch.setitem(fsspec.config.conf, "s3", {**s3, "use_listings_cache": False})
    fs = fs_of(s3)
    recipe = {"faces": {"backend": "dlib", "detect_max_side": 480}, "stages": {"embed": {"crop_size": 200}}}
    fs.pipe(f"{BUCKET}/faces/build.json", json.dumps({"recipe": recipe}).encode())
    fs.pipe(f"{BUCKET}/faces/shards/shard-00000.tar", b"tar")
    for shards in (f"s3://{BUCKET}/faces/shards", f"s3://{BUCKET}/faces/shards/*.tar"):
        assert build_file_for(shards) == f"s3://{BUCKET}/faces/build.json"
    settings, crop, _, _ = read_config(build_file_for(f"s3://{BUCKET}/faces/shards"))
    assert settings.detect_max_side == 480 and crop.size == 200
    assert build_file_for(f"s3://{BUCKET}/elsewhere/shards") is None

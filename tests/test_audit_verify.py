"""datakit verify: damage real shards in every way the issue names and check each is reported."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from audit_fixture import audit_output, audit_template  # noqa: F401  (pytest fixtures)

from datakit import schema
from datakit.audit.cli import main as audit_main
from datakit.audit.folder import OutputFolder
from datakit.audit.verify import verify
from portrait.shardio import member_header as tar_info
from datakit.engine.manifests import record_manifest_hashes
from datakit.store import atomic_write_table


def kinds(report) -> set[str]:
    return {p.kind for p in report.problems}


def kept_keys_in(output, shard: str) -> list[str]:
    t = pq.read_table(output / "images.parquet", columns=["status", "shard", "key"])
    t = t.filter(pc.and_(pc.equal(t["status"], schema.KEPT), pc.equal(t["shard"], shard)))
    return sorted(t["key"].to_pylist())


def test_intact_build_verifies(audit_template, capsys):
    report = verify(OutputFolder(audit_template.output))
    assert report.ok, [p.line() for p in report.problems]
    assert report.shards_checked == 3
    assert report.members_checked == pq.read_metadata(audit_template.output / "shard_members.parquet").num_rows
    assert report.bytes_read == sum(p.stat().st_size for p in (audit_template.output / "shards").glob("*.tar"))
    assert audit_main(["verify", str(audit_template.output), "--quiet"]) == 0
    assert "ok" in capsys.readouterr().out


def test_corrupted_byte_names_the_member(audit_output, tmp_path, capsys):
    out = audit_output.output
    path = out / "shards" / "shard-00001.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".face.jpg"))
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(OutputFolder(out))
    assert kinds(report) == {"corrupted_shard", "corrupted_member"}
    bad = [p for p in report.problems if p.kind == "corrupted_member"]
    assert [(p.shard, p.member) for p in bad] == [("shards/shard-00001.tar", member.name)]
    assert bad[0].key == member.name.split(".")[0]
    problems_file = tmp_path / "problems.json"
    assert audit_main(["verify", str(out), "--quiet", "--json", str(problems_file)]) == 1
    printed = capsys.readouterr().out
    assert f"corrupted_member: shards/shard-00001.tar key {bad[0].key} member {member.name}" in printed
    saved = json.loads(problems_file.read_text())
    assert saved["ok"] is False and saved["counts"] == {"corrupted_shard": 1, "corrupted_member": 1}


def test_truncated_tar(audit_output):
    out = audit_output.output
    path = out / "shards" / "shard-00000.tar"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 100)  # mid-member
    report = verify(OutputFolder(out))
    k = kinds(report)
    assert {"truncated_shard", "corrupted_shard", "unreadable_shard", "missing_member", "missing_sample"} <= k
    truncated = next(p for p in report.problems if p.kind == "truncated_shard")
    assert truncated.shard == "shards/shard-00000.tar" and f"{size} expected" in truncated.detail
    lost = {p.key for p in report.problems if p.kind == "missing_sample"}
    assert lost and lost < set(kept_keys_in(out, "shards/shard-00000.tar"))  # the samples after the cut
    assert all(p.shard == "shards/shard-00000.tar" for p in report.problems if p.kind != "manifest_mismatch")


def test_deleted_tar(audit_output):
    out = audit_output.output
    (out / "shards" / "shard-00002.tar").unlink()
    report = verify(OutputFolder(out))
    assert [p.shard for p in report.problems if p.kind == "missing_shard"] == ["shards/shard-00002.tar"]
    missing = sorted(p.key for p in report.problems if p.kind == "missing_sample")
    assert missing == kept_keys_in(out, "shards/shard-00002.tar")
    assert kinds(report) <= {"missing_shard", "missing_sample", "manifest_mismatch"}
    assert audit_main(["verify", str(out), "--quiet"]) == 1


def test_stray_and_copied_tars_and_temporaries(audit_output):
    out = audit_output.output
    shutil.copy(out / "shards" / "shard-00000.tar", out / "shards" / "shard-00099.tar")
    (out / "shards" / ".tmp-0123-shard-00001.tar").write_bytes(b"half written")
    report = verify(OutputFolder(out))
    extra = [p for p in report.problems if p.kind == "extra_shard"]
    assert [p.shard for p in extra] == ["shards/shard-00099.tar"]
    assert "a copy of shards/shard-00000.tar" in extra[0].detail
    assert [p.shard for p in report.problems if p.kind == "temporary_file"] == ["shards/.tmp-0123-shard-00001.tar"]
    assert kinds(report) == {"extra_shard", "temporary_file"}


def test_shard_listed_twice(audit_output):
    out = audit_output.output
    shards = pq.read_table(out / "shards.parquet")
    atomic_write_table(out / "shards.parquet", pa.concat_tables([shards, shards.slice(0, 1)]))
    report = verify(OutputFolder(out))
    assert [p.shard for p in report.problems if p.kind == "duplicate_shard"] == ["shards/shard-00000.tar"]


def shard_members(out, shard: str) -> list[tuple[str, bytes]]:
    with tarfile.open(out / shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def rewrite_shard(out, shard: str, members: list[tuple[str, bytes]]) -> None:
    """Write the shard with ``members`` and bring shards.parquet / shard_members.parquet in step
    with it, so only the sample-level checks can notice."""
    path = out / shard
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    blob = path.read_bytes()
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    for row in shards:
        if row["path"] == shard:
            row.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    atomic_write_table(out / "shards.parquet", pa.Table.from_pylist(shards, schema=schema.SHARDS_SCHEMA))
    rows = [r for r in pq.read_table(out / "shard_members.parquet").to_pylist() if r["shard"] != shard]
    rows += [{"shard": shard, "key": n.split(".")[0], "member": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in members]
    atomic_write_table(out / "shard_members.parquet", pa.Table.from_pylist(rows, schema=schema.SHARD_MEMBERS_SCHEMA))
    record_manifest_hashes(out)


def rewrite_with_extra(out, shard: str, extra: list[tuple[str, bytes]]) -> None:
    rewrite_shard(out, shard, shard_members(out, shard) + extra)


def test_duplicated_sample_across_shards(audit_output):
    out = audit_output.output
    key = kept_keys_in(out, "shards/shard-00000.tar")[0]
    with tarfile.open(out / "shards" / "shard-00000.tar") as tar:
        copy = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.startswith(key + ".")]
    rewrite_with_extra(out, "shards/shard-00002.tar", copy)
    report = verify(OutputFolder(out))
    dup = [p for p in report.problems if p.kind == "duplicate_sample"]
    assert [p.key for p in dup] == [key] and "shards/shard-00000.tar, shards/shard-00002.tar" in dup[0].detail
    mismatch = [p for p in report.problems if p.kind == "manifest_mismatch"]
    assert {p.shard for p in mismatch} == {"shards/shard-00002.tar"}
    assert {p.detail for p in mismatch} == {"shards.parquet says 13 samples, the tar has 14", "shards.parquet says 2 identities, the tar has 3"}
    assert kinds(report) == {"duplicate_sample", "manifest_mismatch"}


def test_dropped_image_in_a_shard(audit_output):
    out = audit_output.output
    dup = next(i for i in audit_output.items if i.drop and i.drop[1] == "duplicate_near")
    rewrite_with_extra(out, "shards/shard-00001.tar", [(f"{dup.image_id}.jpg", b"\xff\xd8 not really"), (f"{dup.image_id}.json", b"{}")])
    report = verify(OutputFolder(out))
    unexpected = [p for p in report.problems if p.kind == "unexpected_sample"]
    assert [(p.key, p.detail) for p in unexpected] == [(dup.image_id, "its row is dropped")]
    assert any(p.kind == "manifest_mismatch" and "shard-00001" in (p.shard or "") for p in report.problems)


def test_kept_row_without_sample_and_incomplete_sample(audit_output):
    out = audit_output.output
    images = pq.read_table(out / "images.parquet")
    victim = kept_keys_in(out, "shards/shard-00001.tar")[0]
    # a kept row pointing at a shard that lacks its sample
    rows = images.to_pylist()
    moved = next(r for r in rows if r["key"] == victim)
    moved["shard"] = "shards/shard-00002.tar"
    atomic_write_table(out / "images.parquet", pa.Table.from_pylist(rows, schema=schema.IMAGES_SCHEMA))
    report = verify(OutputFolder(out))
    missing = [p for p in report.problems if p.kind == "missing_sample"]
    assert [(p.shard, p.key) for p in missing] == [("shards/shard-00002.tar", victim)]
    assert "found in shards/shard-00001.tar" in missing[0].detail
    assert any(p.kind == "unexpected_sample" and p.key == victim for p in report.problems) is False  # kept elsewhere: reported once


def test_missing_manifest_is_an_error(audit_output, capsys):
    (audit_output.output / "shard_members.parquet").unlink()
    assert audit_main(["verify", str(audit_output.output), "--quiet"]) == 2
    assert "shard_members.parquet" in capsys.readouterr().err


def replace_member(out, shard: str, member: str, data: bytes | None) -> None:
    """Replace (None: remove) one member, the manifests in step."""
    members = [(n, data if n == member else d) for n, d in shard_members(out, shard)]
    rewrite_shard(out, shard, [(n, d) for n, d in members if d is not None])


def trainer_verdicts(out, shard: str) -> dict[str, str | None]:
    """key -> None (the trainer's reader takes the sample) or why it skips it, read the trainer's way."""
    import webdataset as wds

    from trainer.data import CorruptSample, parse_sample

    verdicts = {}
    for sample in wds.DataPipeline(wds.SimpleShardList([str(out / shard)]), wds.tarfile_to_samples()):
        try:
            parse_sample(sample)
            verdicts[sample["__key__"]] = None
        except CorruptSample as exn:
            verdicts[sample["__key__"]] = str(exn)
    return verdicts


def test_verify_reports_exactly_the_samples_the_trainer_skips(audit_output):
    import numpy as np

    from portrait.sample import npy_bytes

    out = audit_output.output
    shard = "shards/shard-00001.tar"
    keys = kept_keys_in(out, shard)
    assert verify(OutputFolder(out)).ok and set(trainer_verdicts(out, shard).values()) == {None}  # accepted: read
    replace_member(out, shard, f"{keys[0]}.landmarks.npy", npy_bytes(np.zeros((3, 2), np.float32)))
    replace_member(out, shard, f"{keys[1]}.embedding.npy", None)
    with tarfile.open(out / shard) as tar:
        meta = json.loads(tar.extractfile(f"{keys[2]}.json").read())
    replace_member(out, shard, f"{keys[2]}.json", json.dumps(dict(meta, identity_id=None)).encode())
    report = verify(OutputFolder(out))
    reported = {(p.kind, p.key) for p in report.problems}
    assert reported == {("invalid_sample", keys[0]), ("incomplete_sample", keys[1]), ("invalid_sample", keys[2])}
    skipped = {k: why for k, why in trainer_verdicts(out, shard).items() if why}
    assert set(skipped) == {keys[0], keys[1], keys[2]}
    assert "landmarks.npy must be 68x2 or 5x2" in skipped[keys[0]] and "embedding.npy" in skipped[keys[1]]
    assert "lacks identity_id" in skipped[keys[2]]
    detail = {p.key: p.detail for p in report.problems}
    assert "landmarks.npy must be 68x2 or 5x2" in detail[keys[0]] and "lacks identity_id" in detail[keys[2]]


def test_an_edited_manifest_row_is_caught(audit_output, capsys):
    """verify once passed after a kept row's caption, label or sha256 was edited (issue 15 item 4)."""
    out = audit_output.output
    rows = pq.read_table(out / "images.parquet").to_pylist()
    kept = [r for r in rows if r["status"] == schema.KEPT]
    kept[0]["caption"], kept[1]["label"], kept[2]["sha256"] = "a photo of someone else", "Someone Else", "0" * 64
    atomic_write_table(out / "images.parquet", pa.Table.from_pylist(rows, schema=schema.IMAGES_SCHEMA))
    report = verify(OutputFolder(out))
    assert [p.shard for p in report.problems if p.kind == "manifest_changed"] == ["images.parquet"]
    assert audit_main(["verify", str(out), "--quiet"]) == 1
    assert "manifest_changed: images.parquet" in capsys.readouterr().out
    # even with build.json's hashes made to match, each kept row is checked against its sample's JSON
    record_manifest_hashes(out)
    report = verify(OutputFolder(out))
    mismatch = {p.key: p.detail for p in report.problems if p.kind == "sample_mismatch"}
    assert kinds(report) == {"sample_mismatch"}
    assert set(mismatch) == {kept[0]["key"], kept[1]["key"]}
    assert "caption: images.parquet has 'a photo of someone else'" in mismatch[kept[0]["key"]]
    assert "label: images.parquet has 'Someone Else'" in mismatch[kept[1]["key"]]
    build = json.loads((out / "build.json").read_text())
    del build["manifests"]
    (out / "build.json").write_text(json.dumps(build))
    assert "manifest_unrecorded" in kinds(verify(OutputFolder(out)))

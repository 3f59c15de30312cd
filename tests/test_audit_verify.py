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
from datakit.stages.shard.write import tar_info
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


def rewrite_with_extra(out, shard: str, extra: list[tuple[str, bytes]]) -> None:
    """Append members to a shard and bring shards.parquet / shard_members.parquet in step with it,
    so only the sample-level checks can notice."""
    path = out / shard
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members + extra:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    blob = path.read_bytes()
    shards = pq.read_table(out / "shards.parquet").to_pylist()
    for row in shards:
        if row["path"] == shard:
            row.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    atomic_write_table(out / "shards.parquet", pa.Table.from_pylist(shards, schema=schema.SHARDS_SCHEMA))
    rows = pq.read_table(out / "shard_members.parquet").to_pylist()
    rows += [{"shard": shard, "key": n.split(".")[0], "member": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in extra]
    atomic_write_table(out / "shard_members.parquet", pa.Table.from_pylist(rows, schema=schema.SHARD_MEMBERS_SCHEMA))


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

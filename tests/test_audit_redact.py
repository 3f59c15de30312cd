"""datakit redact: the removed bytes are gone from every tar and from the work folder; verify passes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from audit_fixture import HOSTILE_LABEL, STAGES, audit_output, audit_template  # noqa: F401  (pytest fixtures)

from datakit import schema
from datakit.audit import redact as redact_mod
from datakit.audit.cli import main as audit_main
from datakit.audit.folder import AuditError, OutputFolder
from datakit.audit.verify import verify
from datakit.stages.shard import MEMBERS
from portrait.shardio import member_header as tar_info
from datakit.store import WorkDir

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def images(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in pq.read_table(out / "images.parquet").to_pylist()}


def sample_bytes(out: Path, keys: set[str]) -> dict[str, bytes]:
    """The members (image, face crop, ...) of these samples, from the shards as they are now."""
    found = {}
    for path in (out / "shards").glob("*.tar"):
        for name, data in tar_members(path).items():
            if name.split(".")[0] in keys:
                found[name] = data
    return found


def work_bulk(out: Path, ids: set[str]) -> dict[tuple, bytes]:
    """Every non-null binary cell of the work folder that belongs to these image ids."""
    cells = {}
    for path in (out / "_work").rglob("*.parquet"):
        t = pq.read_table(path)
        id_col = "image_id" if "image_id" in t.column_names else "key"
        if id_col not in t.column_names:
            continue
        row_ids = t[id_col].to_pylist()
        for f in t.schema:
            if pa.types.is_binary(f.type):
                for i, v in enumerate(t[f.name].to_pylist()):
                    if v is not None and row_ids[i] in ids:
                        cells[(str(path), f.name, row_ids[i])] = v
    return cells


def all_disk_bytes(out: Path) -> list[bytes]:
    """Every tar's raw bytes and every work-folder binary cell (decompressed)."""
    blobs = [p.read_bytes() for p in (out / "shards").rglob("*") if p.is_file()]
    for path in (out / "_work").rglob("*.parquet"):
        t = pq.read_table(path)
        for f in t.schema:
            if pa.types.is_binary(f.type):
                blobs += [v for v in t[f.name].to_pylist() if v is not None]
    return blobs


def test_redact_identity_removes_every_byte(audit_output, capsys):
    out = audit_output.output
    tiger = {i.image_id for i in audit_output.items if i.label == "Tiger Woods"}
    before_rows = images(out)
    kept = {i for i in tiger if before_rows[i]["status"] == schema.KEPT}
    assert len(kept) == 7 and len(tiger) == 9
    members = sample_bytes(out, kept)
    jpgs = [d for n, d in members.items() if n.endswith(".jpg")]  # K.jpg and K.face.jpg
    assert len(jpgs) == 14
    work_cells = work_bulk(out, tiger)
    assert len(work_cells) >= 2 * 7 + 2  # image bytes and face crops of the kept, image bytes of the dropped
    hashes = shard_hashes(out)
    tiger_shard = {before_rows[i]["shard"] for i in kept}
    assert len(tiger_shard) == 1

    code = audit_main(["redact", str(out), "--identity", "tiger_woods", "--reason", "takedown request #12"])
    assert code == 0, capsys.readouterr()

    # gone from every tar, as whole members and as byte strings anywhere in the files
    blobs = all_disk_bytes(out)
    for data in jpgs + list(work_cells.values()):
        assert not any(data in blob for blob in blobs)
    assert not sample_bytes(out, kept)
    # only the shard that held them was rewritten
    after = shard_hashes(out)
    changed = {name for name in hashes if hashes[name] != after.get(name)}
    assert {f"shards/{n}" for n in changed} == tiger_shard
    # manifests
    rows = images(out)
    for i in tiger:
        r, b = rows[i], before_rows[i]
        assert r["status"] == schema.REDACTED and r["redaction_reason"] == "takedown request #12"
        assert r["redacted_at"].endswith("Z")
        assert (r["locator"], r["sha256"], r["caption"], r["drop_stage"], r["reason"]) == (b["locator"], b["sha256"], b["caption"], b["drop_stage"], b["reason"])
        assert r["embedding"] is None and r["landmarks5"] is None  # the biometric template goes too
        assert r["phash"] is None and r["phash_mirror"] is None  # a perceptual hash would find the photo again
    assert all(before_rows[i]["phash"] for i in kept)
    others = [i for i in rows if i not in tiger]
    assert all(rows[i] == before_rows[i] for i in others)
    ident = before_rows[next(iter(kept))]["identity_id"]
    assert ident not in pq.read_table(out / "identities.parquet")["identity_id"].to_pylist()
    members_left = pq.read_table(out / "shard_members.parquet")["key"].to_pylist()
    assert not set(members_left) & tiger
    log = [json.loads(line) for line in (out / "redactions.jsonl").read_text().splitlines()]
    assert len(log) == 1 and sorted(log[0]["image_ids"]) == sorted(tiger) and log[0]["reason"] == "takedown request #12"
    assert log[0]["shards_rewritten"] == sorted(tiger_shard)
    report = verify(OutputFolder(out))
    assert report.ok, [p.line() for p in report.problems]


def test_rewritten_tar_keeps_the_contract_form(audit_output):
    out = audit_output.output
    nicole = sorted(i.image_id for i in audit_output.items if i.label == "Nicole Kidman" and i.drop is None)
    target = nicole[3]
    shard = images(out)[target]["shard"]
    before = tar_members(out / shard)
    redact_mod.redact(OutputFolder(out), "asked", image_ids=[target], now=NOW)
    # byte for byte the tar the shard writer makes from the remaining members, in their order
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in before.items():
            if not name.startswith(target + "."):
                tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    assert (out / shard).read_bytes() == expected.getvalue()
    with tarfile.open(out / shard) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    # the trainer's reader sees the remaining samples, whole, and not the removed one
    read = {s["__key__"]: s for s in wds.WebDataset(str(out / shard), shardshuffle=False)}
    assert sorted(read) == sorted({n.split(".")[0] for n in before} - {target})
    assert all({"jpg", "face.jpg", "json"} <= set(s) for s in read.values())
    row = images(out)[target]
    assert row["redacted_at"] == "2025-06-15T15:06:40Z"
    shards = {r["path"]: r for r in pq.read_table(out / "shards.parquet").to_pylist()}
    assert shards[shard]["samples"] == len({n.split(".")[0] for n in before}) - 1
    assert shards[shard]["sha256"] == hashlib.sha256((out / shard).read_bytes()).hexdigest()
    identity = {r["identity_id"]: r for r in pq.read_table(out / "identities.parquet").to_pylist()}[row["identity_id"]]
    assert identity["images"] == 7 and identity["female"] == 7  # recounted; still >= 5, so kept
    assert verify(OutputFolder(out)).ok


def test_identity_left_too_small_is_dropped_not_redacted(audit_output):
    out = audit_output.output
    salley = sorted(i.image_id for i in audit_output.items if i.label == HOSTILE_LABEL)
    assert len(salley) == 5
    rest = set(salley[1:])
    rest_members = sample_bytes(out, rest)
    result = redact_mod.redact(OutputFolder(out), "asked", image_ids=[salley[0]], now=NOW)
    assert result.image_ids == [salley[0]] and sorted(result.also_dropped) == sorted(rest)
    rows = images(out)
    assert rows[salley[0]]["status"] == schema.REDACTED
    for i in rest:
        assert (rows[i]["status"], rows[i]["drop_stage"], rows[i]["reason"]) == (schema.DROPPED, "redact", "identity_too_small")
        assert "left with 4 images" in rows[i]["detail"] and rows[i]["redacted_at"] is None
        assert rows[i]["embedding"] is not None  # not redacted: only out of the corpus
    # out of the shards, but their work-folder bytes stay (nobody asked for them to go)
    assert not sample_bytes(out, rest)
    assert not any(d in blob for d in rest_members.values() for blob in (p.read_bytes() for p in (out / "shards").glob("*.tar")))
    # each: its image bytes, its face crop and its encoded sample members (shard_encode)
    assert len(work_bulk(out, rest)) == 4 * (2 + len(MEMBERS))
    assert rows[salley[0]]["identity_id"] not in pq.read_table(out / "identities.parquet")["identity_id"].to_pylist()
    assert verify(OutputFolder(out)).ok


def test_a_rerun_manifest_from_the_work_folder_keeps_the_redaction(audit_output):
    """`datakit run` rewrites images.parquet from _work when it finishes; the redaction must survive that."""
    out = audit_output.output
    salley = sorted(i.image_id for i in audit_output.items if i.label == HOSTILE_LABEL)
    redact_mod.redact(OutputFolder(out), "asked", image_ids=[salley[0]], now=NOW)
    rebuilt = schema.conform(WorkDir(out).read_all(STAGES, columns=[c for c in schema.IMAGE_COLUMNS if c not in ("image_bytes", "face_crop")]))
    current = pq.read_table(out / "images.parquet")
    for col in ("image_id", "status", "drop_stage", "reason", "detail", "redacted_at", "redaction_reason", "embedding"):
        assert rebuilt[col].to_pylist() == current[col].to_pylist(), col


def test_redact_by_url_and_a_dropped_image(audit_output):
    out = audit_output.output
    hashes = shard_hashes(out)
    near = next(i for i in audit_output.items if i.drop and i.drop[1] == "duplicate_near")
    near_bytes = work_bulk(out, {near.image_id})
    assert near_bytes
    res = redact_mod.redact(OutputFolder(out), "copyright", urls=["http://imdb.example/nicole_kidman/09.jpg"], image_ids=[near.image_id], now=NOW)
    assert len(res.image_ids) == 2 and res.shards_rewritten == []  # neither was in a shard
    assert shard_hashes(out) == hashes
    rows = images(out)
    assert rows[near.image_id]["status"] == schema.REDACTED and rows[near.image_id]["reason"] == "duplicate_near"
    assert not work_bulk(out, {near.image_id})
    assert not any(d in blob for d in near_bytes.values() for blob in all_disk_bytes(out))
    assert verify(OutputFolder(out)).ok


def test_nothing_changes_on_bad_requests(audit_output, capsys):
    out = audit_output.output
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert audit_main(["redact", str(out), "--identity", "Nobody Here", "--reason", "x"]) == 2
    assert "no row of images.parquet matches" in capsys.readouterr().err
    assert audit_main(["redact", str(out), "--reason", "x"]) == 2
    assert audit_main(["redact", str(out), "--url", "http://imdb.example/tiger_woods/01.jpg", "--reason", " "]) == 2
    assert audit_main(["redact", str(out), "--identity", "Tiger Woods", "--reason", "x", "--dry-run"]) == 0
    assert "would redact 9 images" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".redact.lock"}
    assert after == snapshot


def test_damaged_shard_is_not_blessed(audit_output):
    out = audit_output.output
    kofi = sorted(i.image_id for i in audit_output.items if i.label == "Kofi_Annan" and i.drop is None)
    shard = out / images(out)[kofi[0]]["shard"]
    with tarfile.open(shard) as tar:
        other = next(m for m in tar.getmembers() if not m.name.startswith(kofi[0]) and m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[other.offset_data + 10] ^= 0x55
    shard.write_bytes(bytes(data))
    manifests = {n: (out / n).read_bytes() for n in ("images.parquet", "shards.parquet", "shard_members.parquet", "identities.parquet")}
    with pytest.raises(AuditError, match=f"member {other.name} does not match shard_members.parquet"):
        redact_mod.redact(OutputFolder(out), "x", image_ids=[kofi[0]])
    assert shard.read_bytes() == bytes(data)  # untouched, no temporary left
    assert not list(shard.parent.glob(".tmp-*"))
    assert {n: (out / n).read_bytes() for n in manifests} == manifests


def test_an_interrupted_redaction_says_it_finished_it_when_run_again(audit_output, monkeypatch, capsys):
    """An interrupted redact once left rewritten shards and nothing saying so (issue 15 item 8)."""
    out = audit_output.output
    tiger = sorted(i.image_id for i in audit_output.items if i.label == "Tiger Woods")
    real = redact_mod.scrub_work

    def killed(*a, **kw):
        raise KeyboardInterrupt  # after the shards and images.parquet, before the work folder and the log

    monkeypatch.setattr(redact_mod, "scrub_work", killed)
    try:
        redact_mod.redact(OutputFolder(out), "takedown", identities=["Tiger Woods"], now=NOW)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(redact_mod, "scrub_work", real)
    assert audit_main(["redact", str(out), "--identity", "Tony Blair", "--reason", "other"]) == 2
    assert "was interrupted (--identity 'Tiger Woods' --reason 'takedown')" in capsys.readouterr().err
    assert audit_main(["redact", str(out), "--identity", "Tiger Woods", "--reason", "takedown"]) == 0
    assert "finished a redaction that was interrupted" in capsys.readouterr().out
    assert verify(OutputFolder(out)).ok and not (out / ".redact-pending.json").exists()
    logged = [json.loads(line) for line in (out / "redactions.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and sorted(logged[0]["image_ids"]) == tiger  # logged once, with every image it took


@pytest.mark.parametrize("killed_in", ["update_identities", "scrub_work"])
def test_an_interrupted_redaction_that_dropped_a_small_identity_finishes_everywhere(audit_output, monkeypatch, killed_in):
    """Killed after images.parquet: the rerun still recounts identities.parquet and carries the
    identity_too_small drops into the work folder, so a later `datakit run` keeps them."""
    out = audit_output.output
    salley = sorted(i.image_id for i in audit_output.items if i.label == HOSTILE_LABEL)
    real = getattr(redact_mod, killed_in)

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(redact_mod, killed_in, killed)
    with pytest.raises(KeyboardInterrupt):
        redact_mod.redact(OutputFolder(out), "asked", image_ids=[salley[0]], now=NOW)
    monkeypatch.setattr(redact_mod, killed_in, real)
    result = redact_mod.redact(OutputFolder(out), "asked", image_ids=[salley[0]], now=NOW + 60)
    assert result.finished_interrupted and sorted(result.also_dropped) == salley[1:]
    identity = images(out)[salley[0]]["identity_id"]
    assert identity not in pq.read_table(out / "identities.parquet")["identity_id"].to_pylist()
    rebuilt = schema.conform(WorkDir(out).read_all(STAGES, columns=[c for c in schema.IMAGE_COLUMNS if c not in ("image_bytes", "face_crop")]))
    current = pq.read_table(out / "images.parquet")
    for col in ("image_id", "status", "drop_stage", "reason", "detail", "redacted_at"):
        assert rebuilt[col].to_pylist() == current[col].to_pylist(), col
    assert verify(OutputFolder(out)).ok


def test_an_interrupted_redaction_finishes_when_run_again(audit_output):
    out = audit_output.output
    folder = OutputFolder(out)
    tiger = [i.image_id for i in audit_output.items if i.label == "Tiger Woods"]
    ids, already = redact_mod.select(folder, identities=["Tiger Woods"])
    plan = redact_mod.plan(folder, ids, already, 5)
    redact_mod.rewrite_shards(folder, plan.removed_samples)  # killed right after the shards
    assert not verify(folder).ok
    redact_mod.redact(OutputFolder(out), "takedown", identities=["Tiger Woods"], now=NOW)
    assert verify(OutputFolder(out)).ok
    assert all(images(out)[i]["status"] == schema.REDACTED for i in tiger)
    again = redact_mod.redact(OutputFolder(out), "takedown", identities=["Tiger Woods"], now=NOW)
    assert again.image_ids == [] and sorted(again.already_redacted) == sorted(tiger)
    assert len((out / "redactions.jsonl").read_text().splitlines()) == 1  # nothing done, nothing logged


def test_derived_files_go_and_the_card_is_refreshed(audit_output):
    out = audit_output.output
    assert audit_main(["stats", str(out), "--sheets", "all"]) == 0
    assert audit_main(["report", str(out)]) == 0
    assert audit_main(["card", str(out)]) == 0
    assert "0 redacted" in (out / "README.md").read_text()
    res = redact_mod.redact(OutputFolder(out), "asked", identities=["Tiger Woods"], now=NOW)
    assert sorted(res.derived_files_removed) == ["audit/report.html", "audit/sheets"]
    assert not (out / "audit" / "report.html").exists() and not (out / "audit" / "sheets").exists()
    card = (out / "README.md").read_text()
    assert "9 redacted" in card and "Redactions so far: 1 (9 images)" in card


def test_a_name_takes_its_identity_and_its_labelled_images_not_other_identities(audit_output):
    """An image filed under "Tony_Blair" that clustered into Kofi Annan's identity goes alone."""
    out = audit_output.output
    table = pq.read_table(out / "images.parquet")
    rows = table.to_pylist()
    kofi = sorted((r for r in rows if r["label"] == "Kofi_Annan" and r["status"] == schema.KEPT), key=lambda r: r["image_id"])
    misfiled = kofi[0]["image_id"]
    for r in rows:
        if r["image_id"] == misfiled:
            r["label"] = "Tony_Blair"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "images.parquet")
    folder = OutputFolder(out)
    ids, _ = redact_mod.select(folder, identities=["tony blair"])
    tony = {r["image_id"] for r in rows if r["label"] == "Tony_Blair"}
    assert set(ids) == tony and misfiled in tony  # Tony's rows (kept and dropped) and the misfiled one
    assert not set(ids) & {r["image_id"] for r in kofi[1:]}
    [kofi_id] = {r["identity_id"] for r in kofi}
    assert set(redact_mod.select(folder, identities=[kofi_id])[0]) == {r["image_id"] for r in rows if r["identity_id"] == kofi_id}

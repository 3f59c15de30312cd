"""datakit explain: each stage's decision on one item, with the values behind it."""

from __future__ import annotations

import json
import shutil

from audit_fixture import FACES, FOLDER, audit_output, audit_template  # noqa: F401  (pytest fixtures)

from datakit import schema
from datakit.audit.cli import main as audit_main
from datakit.audit.explain import explain
from datakit.audit.folder import OutputFolder
from datakit.audit.redact import redact


def stage(e: dict, name: str) -> dict:
    return next(s for s in e["stages"] if s["stage"] == name)


def test_kept_item_by_id_shows_every_stage(audit_template, capsys):
    item = next(i for i in audit_template.items if i.locator == "Colin_Powell/Colin_Powell_0003.jpg")
    [e] = explain(OutputFolder(audit_template.output), item.image_id)
    assert e["status"] == schema.KEPT and e["from_work_folder"]
    assert [s["stage"] for s in e["stages"]] == ["download", "detect", "filter", "embed", "attributes", "dedup", "cluster", "caption", "shard_encode", "shard"]
    assert all(s["outcome"] == "kept" for s in e["stages"])
    detect = stage(e, "detect")["values"]
    assert len(detect["face_box"]) == 4 and 0.1 <= detect["face_area_fraction"] <= 0.3
    notes = " | ".join(stage(e, "filter")["notes"])
    assert f"(>= filter.min_area_fraction 10%)" in notes and "filter.min_sharpness 5" in notes
    assert any("Colin Powell, Colin_Powell; 10 kept images" in n for n in stage(e, "cluster")["notes"])
    shard_notes = stage(e, "shard")["notes"]
    assert shard_notes[0].startswith(f"sample {item.image_id} in shards/shard-")
    assert f"{item.image_id}.face.jpg" in shard_notes[1]
    assert stage(e, "download")["values"]["image_bytes"].endswith("bytes in the work folder")
    assert audit_main(["explain", str(audit_template.output), item.image_id, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["image_id"] == item.image_id and printed[0]["stages"][-1]["values"]["key"] == item.image_id


def test_near_duplicate_by_file_name_names_its_twin(audit_template, capsys):
    assert audit_main(["explain", str(audit_template.output), "Laura_Bush_0008.jpg"]) == 0
    text = capsys.readouterr().out
    assert "final: dropped at dedup: duplicate_near" in text
    assert f"duplicate of {schema.image_id(FOLDER, 'Laura_Bush/Laura_Bush_0001.jpg')}: {FOLDER} Laura_Bush/Laura_Bush_0001.jpg (status kept)" in text
    for later in ("cluster", "caption", "shard"):
        assert f"  {later:<11}not reached" in text


def test_url_and_absolute_path(audit_template):
    folder = OutputFolder(audit_template.output)
    [e] = explain(folder, "http://imdb.example/nicole_kidman/09.jpg")
    download = stage(e, "download")
    assert (download["outcome"], download["reason"], download["values"]["http_status"]) == ("dropped", "http_error", 404)
    assert all(s["outcome"] == "not reached" for s in e["stages"][1:])
    [p] = explain(folder, str(FACES / "dev" / "Tony_Blair" / "Tony_Blair_0007.jpg"))
    filt = stage(p, "filter")
    assert (filt["outcome"], filt["reason"]) == ("dropped", "face_blurry")
    assert "sharpness 3.1 (< filter.min_sharpness 5)" in filt["notes"]


def test_cluster_outlier_shows_distance(audit_template):
    [e] = explain(OutputFolder(audit_template.output), "George_W_Bush/George_W_Bush_0001.jpg")
    cluster = stage(e, "cluster")
    assert cluster["reason"] == "identity_outlier" and "embedding distance to its identity's centre: 0.710" in cluster["notes"]


def test_unknown_item_exits_1(audit_template, capsys):
    assert audit_main(["explain", str(audit_template.output), "http://nowhere.example/x.jpg"]) == 1
    assert "no item" in capsys.readouterr().err


def test_without_work_folder_falls_back_to_the_manifest(audit_output):
    out = audit_output.output
    shutil.rmtree(out / "_work")
    [e] = explain(OutputFolder(out), "http://imdb.example/tiger_woods/crowd.jpg")
    assert not e["from_work_folder"]
    assert [s["outcome"] for s in e["stages"][:4]] == ["kept", "kept", "dropped", "not reached"]
    assert stage(e, "filter")["reason"] == "face_too_small_area"
    assert "face area 0.4% of the image (< filter.min_area_fraction 10%)" in stage(e, "filter")["notes"]


def test_redacted_item(audit_output, capsys):
    out = audit_output.output
    item = next(i for i in audit_output.items if i.label == "Tiger Woods" and i.drop is None)
    redact(OutputFolder(out), "takedown #7", image_ids=[item.image_id], now=0)
    assert audit_main(["explain", str(out), item.locator]) == 0
    text = capsys.readouterr().out
    assert "final: redacted 1970-01-01T00:00:00Z: takedown #7" in text
    assert "removed from the shard" in text
    assert "embedding:" not in text and "image_bytes" not in text  # cleared from the work folder

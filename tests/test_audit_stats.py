"""datakit stats: Table 6, Figs. 11-13 and 16, identity sheets; unknown values counted as unknown."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_fixture import FOLDER, URLS, audit_output, audit_template  # noqa: F401  (pytest fixtures)
from PIL import Image

from datakit import schema
from datakit.audit import sheets
from datakit.audit import stats as stats_mod
from datakit.audit.cli import main as audit_main
from datakit.audit.folder import AuditError, OutputFolder
from datakit.store import atomic_write_table


def kept_rows(out):
    return [r for r in pq.read_table(out / "images.parquet").to_pylist() if r["status"] == schema.KEPT]


def test_table6_counts(audit_template):
    st = stats_mod.compute(OutputFolder(audit_template.output))
    rows = kept_rows(audit_template.output)
    expected = []
    for src in (FOLDER, URLS):
        mine = [r for r in rows if r["source"] == src]
        idents = {r["identity_id"] for r in mine}
        expected.append({"source": src, "identities": len(idents), "images": len(mine), "images_per_identity": round(len(mine) / len(idents), 2)})
    idents = {r["identity_id"] for r in rows}
    expected.append({"source": "All", "identities": len(idents), "images": len(rows), "images_per_identity": round(len(rows) / len(idents), 2)})
    assert st.table6 == expected
    # Colin Powell's identity holds images of both sources: counted in each, once in All
    assert st.table6[0]["identities"] + st.table6[1]["identities"] == st.table6[2]["identities"] + 1
    assert (st.items, st.kept, st.dropped, st.redacted) == (68, 56, 12, 0)


def test_unknowns_are_counted_not_dropped(audit_template):
    st = stats_mod.compute(OutputFolder(audit_template.output))
    rows = kept_rows(audit_template.output)
    assert sum(st.age_groups.values()) == sum(st.face_area.values()) == sum(st.gender_images.values()) == len(rows)
    assert st.age_groups["unknown"] == sum(1 for r in rows if r["age"] is None) > 0
    assert st.gender_images["unknown"] == sum(1 for r in rows if r["gender"] is None) > 0
    assert st.gender_identities == {"female": 2, "male": 5, "unknown": 1}  # Hugo Chavez: no gender known
    sizes = Counter(Counter(r["identity_id"] for r in rows).values())
    assert st.identity_size_counts == dict(sorted(sizes.items()))
    assert sum(st.identity_sizes.values()) == 8


def tiny_folder(tmp_path, rows: list[dict]) -> OutputFolder:
    atomic_write_table(tmp_path / "images.parquet", pa.Table.from_pylist(rows, schema=schema.IMAGES_SCHEMA))
    return OutputFolder(tmp_path)


def test_bin_edges(tmp_path):
    areas = [0.0, 0.0999, 0.1, 0.35, 0.9999, 1.0, None, float("nan")]
    ages = [0.0, 9.99, 10.0, 69.9, 70.0, 101.0, None, -1.0]
    rows = [
        {"image_id": f"i{n}", "source": "s", "status": "kept", "identity_id": f"p{n % 2}", "face_area_fraction": a, "age": g, "gender": gd}
        for n, (a, g, gd) in enumerate(zip(areas, ages, ["female", "male", None, "other", "female", "male", "male", None]))
    ]
    rows.append({"image_id": "d", "source": "s", "status": "dropped", "drop_stage": "filter", "reason": "face_too_small_area", "face_area_fraction": 0.01})
    st = stats_mod.compute(tiny_folder(tmp_path, rows))
    assert st.face_area == {"0.0-0.1": 2, "0.1-0.2": 1, "0.2-0.3": 0, "0.3-0.4": 1, "0.4-0.5": 0, "0.5-0.6": 0,
                            "0.6-0.7": 0, "0.7-0.8": 0, "0.8-0.9": 0, "0.9-1.0": 2, "unknown": 2}  # fmt: skip
    assert st.age_groups == {"0-9": 2, "10-19": 1, "20-29": 0, "30-39": 0, "40-49": 0, "50-59": 0, "60-69": 1, "70+": 2, "unknown": 2}
    assert st.gender_images == {"female": 2, "male": 3, "unknown": 3}
    assert st.identity_sizes["1-4"] == 2
    assert st.funnel == [{"step": "filter", "items_in": 9, "dropped": 1, "left": 8}]
    assert st.table6[-1] == {"source": "All", "identities": 2, "images": 8, "images_per_identity": 4.0}


def test_funnel_accounts_for_every_item(audit_template):
    st = stats_mod.compute(OutputFolder(audit_template.output))
    assert [f["step"] for f in st.funnel] == ["download", "detect", "filter", "embed", "attributes", "dedup", "cluster", "caption", "shard"]
    assert st.funnel[0]["items_in"] == st.items and st.funnel[-1]["left"] == st.kept
    assert all(a["left"] == b["items_in"] for a, b in zip(st.funnel, st.funnel[1:]))
    assert sum(d["images"] for d in st.drops) == st.items - st.kept
    assert {"stage": "cluster", "reason": "identity_too_small", "source": FOLDER, "images": 3} in st.drops


def test_stats_command_writes_tables_and_figures(audit_output, capsys):
    out = audit_output.output
    stale = out / "audit" / "sheets" / "fig14_gone.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert audit_main(["stats", str(out), "--sheets", "3", "--identity", "Tiger Woods"]) == 0
    printed = capsys.readouterr().out
    assert "Table 6" in printed and "vgg_folder" in printed and "Fig. 13 age" in printed
    audit = out / "audit"
    table = list(csv.DictReader(io.StringIO((audit / "table6.csv").read_text())))
    st = stats_mod.compute(OutputFolder(out))
    assert [(r["source"], int(r["identities"]), int(r["images"])) for r in table] == [(r["source"], r["identities"], r["images"]) for r in st.table6]
    assert json.loads((audit / "table6.json").read_text()) == st.table6
    assert json.loads((audit / "stats.json").read_text())["age_groups"] == st.age_groups
    for name in ("fig11_identity_sizes", "fig12_face_area", "fig13_age", "fig16_gender"):
        with Image.open(audit / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 300
    identities = sheets.kept_identities(OutputFolder(out))
    tiger = sheets.find(identities, "tiger_woods")[0]
    biggest = [i.identity_id for i in identities if i is not tiger][:2]
    assert sorted(p.name for p in (audit / "sheets").iterdir()) == sorted(f"fig14_{i}.png" for i in [tiger.identity_id, *biggest])
    first = {p.name: p.read_bytes() for p in audit.rglob("*.png")}
    assert audit_main(["stats", str(out), "--sheets", "3", "--identity", "Tiger Woods"]) == 0
    assert {p.name: p.read_bytes() for p in audit.rglob("*.png")} == first  # same folder, same bytes


def test_sheet_tiles_are_the_shard_images(audit_template):
    folder = OutputFolder(audit_template.output)
    [ident] = sheets.find(sheets.kept_identities(folder), "Laura Bush")
    rows = sheets.kept_samples(folder, [ident.identity_id], per_identity=4)[ident.identity_id]
    assert len(rows) == 4 and [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    images = sheets.read_images(folder, rows)
    for row, data in zip(rows, images):
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG"
        import tarfile

        with tarfile.open(audit_template.output / row["shard"]) as tar:
            assert tar.extractfile(f"{row['key']}.jpg").read() == data


def test_errors_are_plain(tmp_path, audit_template, capsys):
    with pytest.raises(AuditError, match="missing images.parquet"):
        stats_mod.compute(OutputFolder(tmp_path))
    assert audit_main(["stats", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert audit_main(["stats", str(audit_template.output), "--sheets", "many", "--out", str(tmp_path / "a")]) == 2
    assert audit_main(["stats", str(audit_template.output), "--identity", "Nobody", "--out", str(tmp_path / "b")]) == 2
    assert "no kept identity is named" in capsys.readouterr().err

"""datakit card: OUTPUT/README.md with front matter the Hugging Face libraries read."""

from __future__ import annotations

import argparse
import json

from audit_fixture import FOLDER, URLS, audit_output, audit_template  # noqa: F401  (pytest fixtures)
from huggingface_hub import DatasetCard

from datakit.audit import stats as stats_mod
from datakit.audit.card import NOT_DECLARED
from datakit.audit.cli import add_commands
from datakit.audit.cli import main as audit_main
from datakit.audit.folder import OutputFolder


def test_card_front_matter_and_body(audit_output):
    out = audit_output.output
    assert audit_main(["card", str(out)]) == 0
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "research-only"
    assert data["size_categories"] == ["n<1K"] and data["task_categories"] == ["text-to-image"]
    assert data["source_datasets"] == [FOLDER, URLS]
    assert data["configs"][0]["data_files"] == [{"split": "train", "path": "shards/*.tar"}]
    recipe_sources = json.loads((out / "build.json").read_text())["recipe"]["sources"]
    for s in recipe_sources:
        assert s["license"] in data["license_details"]
        assert s["license"] in card.text and s["intended_use"] in card.text
    assert "http://vis-www.cs.umass.edu/lfw/" in card.text and "**Research only**" in card.text
    st = stats_mod.compute(OutputFolder(out))
    for r in st.table6:
        assert f"| {r['source']} | {r['identities']} | {r['images']} | {r['images_per_identity']:.2f} |" in card.text
    assert "| 0-9 | 10-19 | 20-29 | 30-39 | 40-49 | 50-59 | 60-69 | 70+ | unknown |" in card.text
    first = (out / "README.md").read_bytes()
    assert audit_main(["card", str(out)]) == 0
    assert (out / "README.md").read_bytes() == first


def test_undeclared_licence_is_said_so(audit_output):
    out = audit_output.output
    build = json.loads((out / "build.json").read_text())
    for s in build["recipe"]["sources"]:
        if s["name"] == URLS:
            s["license"] = None
            s["intended_use"] = None
    (out / "build.json").write_text(json.dumps(build))
    audit_main(["card", str(out)])
    text = (out / "README.md").read_text()
    assert f"| {URLS} | urls | {NOT_DECLARED} | {NOT_DECLARED} |" in text
    assert f"{URLS}: {NOT_DECLARED}" in DatasetCard.load(out / "README.md").data.to_dict()["license_details"]


def test_add_commands_registers_all_six():
    parser = argparse.ArgumentParser(prog="datakit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    for argv in (["stats", "o"], ["report", "o"], ["explain", "o", "x"], ["verify", "o"], ["redact", "o", "--image-id", "i", "--reason", "r"], ["card", "o"]):
        args = parser.parse_args(argv)
        assert callable(args.func) and args.command == argv[0]

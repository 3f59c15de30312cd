"""A changed recipe or source rebuilds only what changed, and the result is the build from scratch.

One small build (12 folder photos, 6 URLs served on 127.0.0.1, 4 items a partition, every
stage) is made once; each test copies it, changes one thing, rebuilds by reuse and compares
with a from-scratch build of the changed recipe: every manifest column but ``attempts``, and
the tars' bytes. Each also checks that the reuse happened (nothing re-fetched or re-detected
that did not change), or the comparison would prove nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datakit.engine import build as runner
from datakit.recipe import load_recipe
from devtools.photoserver import PhotoServer
from devtools.rehearsal.compare import compare_builds

REPO = Path(__file__).resolve().parent.parent
FOLDER_PEOPLE = ("Ben_Affleck", "Nicole_Kidman", "Tony_Blair")
WEB_PEOPLE = ("Tiger_Woods",)
PER_PERSON = 4


class Lab:
    def __init__(self, root: Path, faces: Path, server: PhotoServer):
        self.root, self.faces, self.server = root, faces, server
        self.folder = root / "folder"
        for person in FOLDER_PEOPLE:
            (self.folder / person).mkdir(parents=True)
            for photo in sorted((faces / person).glob("*.jpg"))[:PER_PERSON]:
                shutil.copy(photo, self.folder / person / photo.name)
        self.web = [f"{p}/{f.name}" for p in WEB_PEOPLE for f in sorted((faces / p).glob("*.jpg"))[:PER_PERSON]]
        self.web += [f"Virat_Kohli/{f.name}" for f in sorted((faces / "Virat_Kohli").glob("*.jpg"))[:2]]
        self.recipe = {
            "name": "rebuild", "output": "OUT",
            "sources": [
                {"name": "lfw", "kind": "folder", "root": str(self.folder)},
                {"name": "web", "kind": "urls", "path": "LIST", "name_column": "name"},
            ],
            "ray": {"partition_size": 4},
            "faces": {"backend": "dlib"},
            "stages": {
                "download": {"allow_private_addresses": True, "retries": 0},
                "detect": {}, "filter": {"min_area_fraction": 0.10}, "embed": {},
                "attributes": {}, "dedup": {}, "cluster": {"min_images": 3},
                "caption": {"mode": "template"}, "shard": {"image_size": 96, "max_samples": 8},
            },
        }  # fmt: skip

    def write(self, name: str, recipe: dict, urls: list[str]) -> Path:
        listing = self.root / f"{name}.csv"
        listing.write_text("url,name\n" + "".join(f"{self.server.file_url(u)},{u.split('/')[0]}\n" for u in urls))
        recipe = copy.deepcopy(recipe)
        recipe["output"] = str(self.root / name)
        for source in recipe["sources"]:
            if source["name"] == "web":
                source["path"] = str(listing)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    def build(self, name: str, recipe: dict, urls: list[str], start_from: str | None = None):
        """A build of ``recipe`` in ROOT/name: from scratch, or from a copy of ``start_from``."""
        if start_from is not None:
            shutil.copytree(self.root / start_from, self.root / name)
        path = self.write(name, recipe, urls)
        plan = runner.plan_build(load_recipe(path)) if start_from is not None else None
        runner.run(load_recipe(path), quiet=True, executor="local")
        return plan

    def hits(self) -> dict[str, int]:
        return dict(self.server.hits())


@pytest.fixture(scope="module")
def lab(tmp_path_factory, faces_dir):
    with PhotoServer(faces_dir / "dev") as server:
        lab = Lab(tmp_path_factory.mktemp("rebuild"), faces_dir / "dev", server)
        lab.build("base", lab.recipe, lab.web)
        yield lab


@pytest.fixture(scope="module")
def stricter(lab) -> dict:
    """The recipe with a stricter face-area threshold, built from scratch once."""
    recipe = copy.deepcopy(lab.recipe)
    recipe["stages"]["filter"]["min_area_fraction"] = 0.2
    lab.build("threshold-scratch", recipe, lab.web)
    return recipe


def same_build(lab: Lab, scratch: str, reused: str) -> None:
    compare = compare_builds(lab.root / scratch, lab.root / reused)
    assert compare["problems"] == [], "\n".join(compare["problems"])
    assert compare["tars"] >= 2


def counts(plan) -> dict[str, tuple[int, int]]:
    return {s.name: (len(s.reuse), len(s.recompute)) for s in plan.steps}


def stats(lab: Lab, build: str, step: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((lab.root / build / "_work" / step).glob("stats-*.json"))]


def test_a_changed_filter_threshold_recomputes_from_the_filter_on_and_equals_a_build_from_scratch(lab, stricter):
    before = lab.hits()
    plan = lab.build("threshold", stricter, lab.web, start_from="base")
    assert lab.hits() == before, "a threshold change fetched images again"
    n = counts(plan)
    assert n["download"] == n["detect"] == (5, 0) and n["filter"] == (0, 5) and n["shard"] == (0, 5)
    assert plan.steps[2].why == "settings changed: min_area_fraction 0.1 -> 0.2"
    assert plan.steps[3].why == "its input changed (filter recomputes)"
    # a stricter threshold lets no new face through: every face embed sees was embedded before
    embed = stats(lab, "threshold", "embed")
    assert sum(s["carried"] for s in embed) == sum(s["items_in"] for s in embed) > 0
    # nor does the age/gender model see a face again, though its batches are now smaller
    attributes = stats(lab, "threshold", "attributes")
    assert sum(s["carried"] for s in attributes) == sum(s["items_in"] for s in attributes) > 0
    same_build(lab, "threshold-scratch", "threshold")


def test_diff_shows_what_the_threshold_change_dropped(lab, stricter, capsys):
    """`datakit diff OLD NEW`, the build against its own previous state, and the report's section."""
    from datakit.audit.folder import OutputFolder
    from datakit.audit.report import changes_html
    from datakit.cli import main

    base = {r["image_id"]: r for r in pq.read_table(lab.root / "base" / "images.parquet").to_pylist()}
    rows = {r["image_id"]: r for r in pq.read_table(lab.root / "threshold-scratch" / "images.parquet").to_pylist()}
    newly = sorted(i for i, r in rows.items() if r["reason"] == "face_too_small_area" and base[i]["status"] == "kept")
    assert newly
    assert main(["diff", str(lab.root / "base"), str(lab.root / "threshold-scratch"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    moved = {c["to"]: c for c in found["changed"] if c["from"] == "kept"}
    assert moved["dropped filter/face_too_small_area"]["count"] == len(newly)
    assert found["items"]["added"] == found["items"]["removed"] == []
    assert found["sources"]["lfw"]["old_items"] == found["sources"]["lfw"]["new_items"] == 12
    assert found["sources"]["lfw"]["new_kept"] < found["sources"]["lfw"]["old_kept"]
    if not (lab.root / "threshold").exists():
        lab.build("threshold", stricter, lab.web, start_from="base")
    assert main(["diff", str(lab.root / "threshold"), "--json"]) == 0  # its previous state: the base build's
    assert json.loads(capsys.readouterr().out)["changed"] == found["changed"]
    assert main(["diff", str(lab.root / "threshold")]) == 0
    assert f"{len(newly)}  kept  ->  dropped filter/face_too_small_area" in capsys.readouterr().out
    assert "face_too_small_area" in changes_html(OutputFolder(lab.root / "threshold"))


def test_a_changed_caption_setting_recomputes_captions_and_shards_only(lab):
    recipe = copy.deepcopy(lab.recipe)
    recipe["stages"]["caption"]["closeup_area_fraction"] = 0.15
    lab.build("caption-scratch", recipe, lab.web)
    plan = lab.build("caption", recipe, lab.web, start_from="base")
    n = counts(plan)
    assert all(n[s] == (5, 0) for s in ("download", "detect", "filter", "embed", "attributes", "phash", "dedup", "cluster"))
    assert n["caption"] == (0, 5) and n["shard_encode"] == (0, 5)
    assert {s.name: s.why for s in plan.steps}["caption"] == "settings changed: closeup_area_fraction 0.3 -> 0.15"
    base_captions = pq.read_table(lab.root / "base" / "images.parquet").column("caption").to_pylist()
    new_captions = pq.read_table(lab.root / "caption" / "images.parquet").column("caption").to_pylist()
    assert base_captions != new_captions
    same_build(lab, "caption-scratch", "caption")


def test_a_url_list_edit_and_a_new_source_rebuild_only_their_items(lab):
    """A row added to the list and one removed, and a new folder source, in one change: only
    the new URL is fetched, the removed row leaves the build, the new items go through every stage."""
    added = sorted((lab.faces / "Virat_Kohli").glob("*.jpg"))[5]
    urls = [u for u in lab.web if u != lab.web[1]] + [f"Virat_Kohli/{added.name}"]
    extra = lab.root / "extra" / "Mindy_Kaling"
    extra.mkdir(parents=True)
    for photo in sorted((lab.faces / "Mindy_Kaling").glob("*.jpg"))[:PER_PERSON]:
        shutil.copy(photo, extra / photo.name)
    recipe = copy.deepcopy(lab.recipe)
    recipe["sources"].append({"name": "extra", "kind": "folder", "root": str(extra.parent)})
    lab.build("sources-scratch", recipe, urls)
    before = lab.hits()
    plan = lab.build("sources", recipe, urls, start_from="base")
    after = lab.hits()
    fetched = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert fetched == {f"/files/Virat_Kohli/{added.name}": 1}
    assert plan.items_change == "sources changed: extra +4 -0, web +1 -1"
    # 18 items filled partitions 0-4 (12 folder items, then 6 URLs); the URL list shifted by one row
    # from partition 3 on, the new source fills partition 5
    assert counts(plan)["detect"] == (3, 3)
    removed = pq.read_table(lab.root / "sources" / "removed.parquet").to_pylist()
    assert [(r["source"], r["status"], r["reason"]) for r in removed] == [("web", "removed", "removed_from_source")]
    assert removed[0]["locator"].endswith(lab.web[1])
    rows = pq.read_table(lab.root / "sources" / "images.parquet").to_pylist()
    assert removed[0]["image_id"] not in {r["image_id"] for r in rows}
    assert sum(r["source"] == "extra" and r["status"] == "kept" and r["shard"] is not None for r in rows) >= 3
    (lab.root / "sources" / "removed.parquet").unlink()  # a build from scratch has nothing removed
    same_build(lab, "sources-scratch", "sources")


@pytest.mark.timeout(300)
def test_a_rebuild_killed_midway_resumes_to_the_build_from_scratch(lab, stricter):
    shutil.copytree(lab.root / "base", lab.root / "killed")
    path = lab.write("killed", stricter, lab.web)
    work = lab.root / "killed" / "_work"
    proc = subprocess.Popen([sys.executable, "-m", "datakit", "run", str(path), "--executor", "local", "--quiet"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # stale partitions are set aside before anything runs; then wait for a new embed partition
        while not ((work / "_previous" / "shard_encode").exists() and (work / "embed" / "stats-00001.json").exists()):
            assert proc.poll() is None, "the rebuild ended before it could be killed"
            assert time.monotonic() < deadline, "the rebuild never reached embed"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (work / "_previous").exists() and not (work / "shard" / "_SUCCESS").exists(), "killed too late to test anything"
    plan = runner.plan_build(load_recipe(path))
    kept = counts(plan)
    assert kept["download"] == (5, 0) and kept["filter"][0] >= 2, "the partitions the killed run finished were not kept"
    runner.run(load_recipe(path), quiet=True, executor="local")
    assert not (work / "_previous").exists()
    same_build(lab, "threshold-scratch", "killed")

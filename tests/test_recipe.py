"""Recipe loading: every mistake is reported with the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datakit.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, recipe: dict) -> Path:
    (tmp_path / "photos" / "Someone").mkdir(parents=True, exist_ok=True)
    (tmp_path / "list.csv").write_text("url,name\nhttp://example.org/a.jpg,A\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def base() -> dict:
    return {
        "name": "t",
        "output": "out",
        "sources": [
            {"name": "f", "kind": "folder", "root": "photos"},
            {"name": "u", "kind": "urls", "path": "list.csv", "name_column": "name"},
        ],
        "stages": {"download": {"timeout_s": 5}},
    }


def error_of(tmp_path, recipe) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, recipe))
    return str(info.value)


def test_valid_recipe_resolves_paths_relative_to_the_file(tmp_path):
    recipe = load_recipe(write(tmp_path, base()))
    assert recipe.output == (tmp_path / "out").resolve()
    assert recipe.sources[0].root == (tmp_path / "photos").resolve()
    assert recipe.stage_names() == ["download"]
    assert recipe.stage_settings("download").timeout_s == 5


def test_unknown_top_level_key_is_named(tmp_path):
    r = base() | {"ouput": "x"}
    msg = error_of(tmp_path, r)
    assert "recipe.yaml: ouput: unknown key" in msg


def test_unknown_stage_setting_is_named_with_its_path(tmp_path):
    r = base()
    r["stages"]["download"]["timeout"] = 3
    assert "stages.download.timeout: unknown key" in error_of(tmp_path, r)


def test_wrong_type_names_key_and_value(tmp_path):
    r = base()
    r["stages"]["download"]["timeout_s"] = "soon"
    msg = error_of(tmp_path, r)
    assert "stages.download.timeout_s" in msg and "'soon'" in msg


def test_unknown_stage_lists_the_known_ones(tmp_path):
    r = base()
    r["stages"]["detekt"] = {}
    msg = error_of(tmp_path, r)
    assert "detekt" in msg and "download" in msg


def test_missing_folder_is_named(tmp_path):
    r = base()
    r["sources"][0]["root"] = "nowhere"
    msg = error_of(tmp_path, r)
    assert "sources[0].root: folder not found" in msg and "nowhere" in msg


def test_missing_url_list_is_named(tmp_path):
    r = base()
    r["sources"][1]["path"] = "gone.csv"
    assert "sources[1].path: file not found" in error_of(tmp_path, r)


def test_source_kind_specific_key_is_checked(tmp_path):
    r = base()
    r["sources"][0]["url_column"] = "url"  # a folder source has no URL column
    assert "sources[0].url_column: unknown key" in error_of(tmp_path, r)


def test_missing_required_key(tmp_path):
    r = base()
    del r["output"]
    assert "output: required key is missing" in error_of(tmp_path, r)


def test_duplicate_source_names(tmp_path):
    r = base()
    r["sources"][1]["name"] = "f"
    assert "repeated: f" in error_of(tmp_path, r)


def test_unset_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    r = base()
    r["sources"][1]["base_url"] = "${NOT_SET_ANYWHERE}"
    msg = error_of(tmp_path, r)
    assert "sources[1].base_url" in msg and "NOT_SET_ANYWHERE is not set" in msg


def test_environment_variable_is_substituted(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR", "http://127.0.0.1:9/")
    r = base()
    r["sources"][1]["base_url"] = "${MIRROR}"
    assert load_recipe(write(tmp_path, r)).sources[1].base_url == "http://127.0.0.1:9/"


def test_hash_ignores_where_ray_runs_but_not_settings(tmp_path):
    a = load_recipe(write(tmp_path, base()))
    r = base() | {"ray": {"address": "ray://somewhere:10001"}}
    b = load_recipe(write(tmp_path, r))
    assert a.hash() == b.hash()
    r = base()
    r["stages"]["download"]["timeout_s"] = 6
    assert load_recipe(write(tmp_path, r)).hash() != a.hash()


def test_not_yaml_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="r.yaml: expected a mapping"):
        load_recipe(p)


def test_shipped_recipes_are_valid(monkeypatch, tmp_path):
    """Every recipe under pipelines/, its ${VARIABLES} pointed at the layout samples of the tests."""
    layouts = REPO / "tests" / "data" / "layouts"
    env = {
        "DATAKIT_DEMO_BASE_URL": "http://127.0.0.1:1/",
        "VGGFACE2_HQ": str(layouts / "vggface2_hq"),
        "VGGFACE2_META": str(layouts / "vggface2_hq" / "identity_meta.csv"),
        "IMDB_FACE_CSV": str(layouts / "imdb_face" / "IMDb-Face.csv"),
        "WEB_URLS": str(layouts / "web" / "urls.csv"),
        "INSIGHTFACE_MODELS": str(tmp_path / "buffalo_l"),
        "CAPTION_MODEL": str(tmp_path / "model"),
        "OUTPUT": str(tmp_path / "out"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    paths = sorted((REPO / "pipelines").rglob("*.yaml"))
    assert {p.stem for p in paths} >= {"demo", "hifi-portrait", "vggface2-hq", "imdb-face", "web-urls"}
    for path in paths:
        load_recipe(path)


def test_cli_check_reports_the_key(tmp_path, capsys):
    from datakit.cli import main

    r = base()
    r["stages"]["download"]["retries"] = -1
    path = write(tmp_path, r)
    assert main(["check", str(path)]) == 2
    assert "stages.download.retries" in capsys.readouterr().out


def test_an_output_url_is_kept_as_given_and_storage_options_are_not_part_of_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_SECRET", "very-secret")
    r = base() | {"output": "s3://bucket/builds/x/", "storage_options": {"endpoint_url": "http://127.0.0.1:9", "secret": "${S3_SECRET}"}}
    recipe = load_recipe(write(tmp_path, r))
    assert recipe.output == "s3://bucket/builds/x"
    assert recipe.storage_options == {"endpoint_url": "http://127.0.0.1:9", "secret": "very-secret"}
    assert "very-secret" not in str(recipe.canonical()) and "storage_options" not in recipe.canonical()
    other = load_recipe(write(tmp_path, r | {"storage_options": {"endpoint_url": "http://127.0.0.1:10"}}))
    assert other.hash() == recipe.hash(), "where the store is reached from must not change what is built"
    assert load_recipe(write(tmp_path, r | {"output": "s3://bucket/builds/y"})).hash() != recipe.hash()


def test_stall_settings_do_not_change_the_recipe_hash_and_are_validated(tmp_path):
    plain = load_recipe(write(tmp_path, base()))
    assert plain.ray.stall_timeout == 900 and plain.ray.stall_restarts == 2
    tuned = load_recipe(write(tmp_path, base() | {"ray": {"stall_timeout": 30, "stall_restarts": 0}}))
    assert tuned.hash() == plain.hash()
    assert "ray.stall_timeout" in error_of(tmp_path, base() | {"ray": {"stall_timeout": -1}})


def test_redaction_logs_must_exist_and_a_bad_line_is_named(tmp_path):
    assert "redactions[0]: file not found" in error_of(tmp_path, base() | {"redactions": ["gone.jsonl"]})
    from datakit.sources import read_redactions

    log = tmp_path / "redactions.jsonl"
    log.write_text('{"image_ids": ["a"], "time": "t", "reason": "r", "dry_run": false}\n{"image_ids": 5}\n')
    with pytest.raises(RecipeError, match=r"redactions.jsonl line 2: not a redaction record"):
        read_redactions([log])
    log.write_text('{"image_ids": ["a"], "time": "t1", "reason": "r1"}\n{"image_ids": ["a", "b"], "time": "t2", "reason": "r2"}\n'
                   '{"image_ids": ["c"], "time": "t3", "reason": "r3", "dry_run": true}\n')  # fmt: skip
    assert read_redactions([log]) == {"a": {"redacted_at": "t1", "redaction_reason": "r1"}, "b": {"redacted_at": "t2", "redaction_reason": "r2"}}


def test_a_stage_setting_named_like_a_source_kind_keeps_its_name_in_errors(tmp_path):
    error = error_of(tmp_path, base() | {"stages": {"download": {"urls": 1}}})
    assert "stages.download.urls: unknown key" in error
    error = error_of(tmp_path, base() | {"sources": [{"name": "f", "kind": "folder", "root": "photos", "bogus": 1}]})
    assert "sources[0].bogus: unknown key" in error


def test_optional_settings_left_at_their_defaults_stay_out_of_the_hash(tmp_path):
    """A changed hash refuses to resume every existing build, so a new optional setting must not
    enter the hashed form of recipes that do not use it. Extend these sets only for a change
    that really alters what a recipe builds."""
    canonical = load_recipe(write(tmp_path, base())).canonical()
    assert set(canonical) == {"name", "description", "output", "sources", "faces", "stages", "ray"}
    assert set(canonical["ray"]) == {"partition_size"}
    logged = load_recipe(write(tmp_path, base() | {"redactions": ["list.csv"]})).canonical()
    assert logged["redactions"] == [str((tmp_path / "list.csv").resolve())]


def test_cli_prints_user_text_as_written_never_as_markup(tmp_path, capsys):
    """A name, path or mistyped key holding [/x] or [photos] is shown as is (Rich markup once
    crashed on [/x] and swallowed [photos])."""
    from datakit.cli import main

    folder = tmp_path / "[photos]"
    folder.mkdir()
    r = base()
    r["name"] = "set [/x] one"
    r["stages"]["download"]["re[/x]tries"] = 1
    path = write(folder, r)
    assert main(["check", str(path)]) == 2
    assert "re[/x]tries" in capsys.readouterr().out
    del r["stages"]["download"]["re[/x]tries"]
    path = write(folder, r)
    assert main(["check", str(path)]) == 0
    assert f"{path}: ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "list_name, content, expected",
    [
        ("l.csv", "link,name\nhttp://example.org/a.jpg,A\n", "url_column: column 'url' not in"),
        ("l.dat", "url\nhttp://example.org/a.jpg\n", "cannot tell the format from the suffix"),
        ("l.jsonl", '{"url": "http://example.org/a.jpg"}\n{"url": oops}\n', "line 2 is not valid JSON"),
        ("l.csv", "url,name\nhttp://example.org/a.jpg,A,B,C\n", "line 2: 4 cells, the header has 2"),
        ("l.csv", "url,name\nhttp://example.org/a.jpg," + "x" * 1_000_000 + "\n", "line 2: field larger than field limit"),
    ],
    ids=["url-column-missing", "unknown-suffix", "broken-jsonl", "ragged-csv", "huge-field"],
)
def test_check_opens_the_lists_as_run_does(tmp_path, capsys, list_name, content, expected):
    """`datakit check` once said ok for lists that `run` then refused: it never opened them (issue 15 item 5)."""
    from datakit.cli import main

    (tmp_path / list_name).write_text(content)
    r = base()
    r["sources"] = [{"name": "u", "kind": "urls", "path": list_name}]
    path = write(tmp_path, r)
    assert main(["check", str(path)]) == 2
    checked = capsys.readouterr().out
    assert expected in checked and list_name in checked and "Traceback" not in checked
    assert main(["run", str(path), "--executor", "local", "--quiet"]) == 2
    ran = capsys.readouterr().out
    assert checked.splitlines()[-1].split(": ", 1)[1] in ran  # the same words, from the same code


def test_check_counts_the_rows_of_a_good_list(tmp_path, capsys):
    from datakit.cli import main

    assert main(["check", str(write(tmp_path, base()))]) == 0
    assert "u: 1 rows" in capsys.readouterr().out


def test_the_readmes_first_build_command_works_as_written(monkeypatch, capsys):
    """It once failed: DATAKIT_DEMO_BASE_URL unset (issue 15 item 8)."""
    import re
    import shlex

    from datakit.cli import main

    text = (REPO / "README.md").read_text()
    block = text[text.index("## Running a build") :]
    line = re.search(r"```bash\n(.+?)\s+#", block).group(1)
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    command = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    assert command[:2] == [".venv/bin/datakit", "check"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    assert main(command[1:]) == 0, capsys.readouterr()
    assert "pipelines/demo.yaml: ok" in capsys.readouterr().out

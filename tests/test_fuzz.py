"""Generated recipes, list files and folder trees through `datakit check` and `datakit run`.

The properties (issue 15): no input gives a traceback; `check` accepts exactly the recipes `run`
accepts (it opens the lists with run's code); and a run that is accepted ends with one manifest
row per input item (every file of the tree, every row of the list), whatever its name, bytes
or type. Few examples (each is a real build, in process, without Ray) and no deadline.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datakit.cli import main

PHOTO = sorted((Path(__file__).resolve().parent.parent / "data" / "demo" / "folder" / "Colin_Powell").iterdir())[0].read_bytes()

FUZZ = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

# names with the characters that once broke things: markup brackets, a leading dot, spaces,
# non-ASCII, and (as bytes) a byte that is not UTF-8
NAME = st.tuples(st.text(alphabet="ab[/x] .é_-", min_size=1, max_size=8), st.booleans()).map(
    lambda t: os.fsencode(t[0]) + (b"\xff" if t[1] else b"")
).filter(lambda b: b not in (b".", b"..") and b"/" not in b)
CONTENT = st.one_of(st.just(PHOTO), st.just(b""), st.binary(max_size=64), st.just(PHOTO[: len(PHOTO) // 2]))
TREE = st.dictionaries(NAME, st.dictionaries(NAME, CONTENT, min_size=1, max_size=3), min_size=1, max_size=3)

# URL cells: refused before any connection (loopback, other schemes, junk), so nothing leaves the machine
URL = st.sampled_from(["http://127.0.0.1:9/a.jpg", "ftp://example.org/a.jpg", "", "not a url", "http://[::1]/x", "http://10.0.0.1/[/x]"])
CELL = st.text(alphabet="ab[/x],\"\n é", max_size=6)
ROWS = st.lists(st.tuples(URL, CELL), min_size=0, max_size=5)
LIST_FORMAT = st.sampled_from(["csv", "tsv", "jsonl", "dat"])

RECIPE_CHANGES = st.sampled_from([  # half of them valid, so that half the examples are built
    {}, {}, {}, {}, {"name": "set [/x] one"}, {"ray": {"partition_size": 0}}, {"ray": {"partition_size": "two"}},
    {"stages": {"download": {"timeout_s": -1}}}, {"stages": {"download": {"re[/x]tries": 1}}},
    {"stages": {"download": {"min_side": 8}}}, {"ouput": "x"}, {"sources": []},
])  # fmt: skip


def write_tree(root: Path, tree: dict) -> int:
    """Write the tree; the number of input items it holds (files; a hidden folder is one)."""
    items = 0
    for folder, files in tree.items():
        path = os.fsencode(root) + b"/" + folder
        os.makedirs(path, exist_ok=True)
        if folder.startswith(b"."):
            items += 1  # a hidden folder is one row, whatever it holds
        for name, content in files.items():
            with open(path + b"/" + name, "wb") as f:
                f.write(content)
            items += 0 if folder.startswith(b".") else 1
    return items


def write_list(path: Path, rows: list, fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "name": n}) + "\n" for u, n in rows))
        return
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",")
    writer.writerow(["url", "name"])
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@FUZZ
@given(tree=TREE, rows=ROWS, fmt=LIST_FORMAT, change=RECIPE_CHANGES, link_out=st.booleans())
def test_check_and_run_never_crash_and_account_for_every_item(tree, rows, fmt, change, link_out):
    with tempfile.TemporaryDirectory(prefix="fuzz-[x]-") as tmp:
        tmp = Path(tmp)
        expected = write_tree(tmp / "photos", tree)
        if link_out:  # a link out of the root: a row, never read
            (tmp / "secret").write_text("root:x:0:0")
            (tmp / "photos" / "link.jpg").symlink_to(tmp / "secret")
            expected += 1
        write_list(tmp / f"list.{fmt}", rows, fmt)
        expected += len(rows)
        recipe = merge({
            "name": "fuzz", "output": "out",
            "sources": [{"name": "photos", "kind": "folder", "root": "photos"},
                        {"name": "web", "kind": "urls", "path": f"list.{fmt}", "name_column": "name"}],
            "stages": {"download": {"timeout_s": 2, "retries": 0}},
            "ray": {"partition_size": 3},
        }, change)  # fmt: skip
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))

        checked, check_out = _cli(["check", str(path)])
        ran, run_out = _cli(["run", str(path), "--executor", "local", "--quiet"])
        for out in (check_out, run_out):
            assert "Traceback" not in out, out
        assert checked in (0, 2) and ran == checked, (check_out, run_out)  # check accepts what run accepts
        if ran == 0:
            images = pq.read_table(tmp / "out" / "images.parquet")
            assert images.num_rows == expected, run_out
            assert set(images.column("status").to_pylist()) <= {"kept", "dropped"}
            assert all(r for s, r in zip(images.column("status").to_pylist(), images.column("reason").to_pylist()) if s == "dropped")
            assert "root:x" not in json.dumps(images.to_pylist(), default=str)
        else:
            assert "recipe.yaml" in check_out or "list." in check_out, check_out


def _cli(argv: list[str]) -> tuple[int, str]:
    """Exit code and everything printed, tracebacks included (a crash is a result here, not an error)."""
    import contextlib
    import traceback

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exn:
            code = exn.code
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=out)
            code = 1
    return code, out.getvalue()

"""Sources: folder and URL lists become items with stable ids, labels and carried columns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datakit import schema
from datakit.recipe import FolderSource, RecipeError, UrlSource
from datakit.sources import iter_items

IMDB_HEADER = "name,index,image,rect,height,width,url"
IMDB_ROWS = [
    "Fred Astaire,nm0000001_rm3343756032_1899-5-10_1968,nm0000001_rm3343756032_1899-5-10_1968.jpg,"
    '"301 96 490 285",0750,0500,http://example.org/a.jpg',
    "Fred Astaire,nm0000001_rm3748091648_1899-5-10_1935,x.jpg,\"1 2 3 4\",0400,0300,http://example.org/b.jpg",
]


def items(*sources):
    return list(iter_items(sources))


def test_folder_source_labels_and_order(tmp_path):
    for label, files in {"B_person": ["2.jpg", "1.jpg"], "A_person": ["x.png"]}.items():
        (tmp_path / label).mkdir()
        for f in files:
            (tmp_path / label / f).write_bytes(b"not checked here")
    (tmp_path / "A_person" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "loose.jpg").write_bytes(b"")
    rows = items(FolderSource(name="f", kind="folder", root=tmp_path))
    assert [r["locator"] for r in rows] == ["A_person/.hidden.jpg", "A_person/x.png", "B_person/1.jpg", "B_person/2.jpg", "loose.jpg"]
    assert [r["label"] for r in rows] == ["A_person", "A_person", "B_person", "B_person", None]
    assert rows[1]["fetch_uri"] == str(tmp_path / "A_person" / "x.png")
    assert all(r["status"] == schema.KEPT and r["source_kind"] == "folder" for r in rows[1:])
    assert (rows[0]["status"], rows[0]["reason"], rows[0]["fetch_uri"]) == (schema.DROPPED, "hidden_file", None)


def test_folder_source_never_reads_outside_its_root_unless_told(tmp_path):
    """Links out of ROOT were followed (/etc/passwd read); linked and hidden folders vanished
    without a row (issue 15 item 3)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "P").mkdir(parents=True)
    (outside / "Q").mkdir(parents=True)
    (outside / "secret.txt").write_text("root:x:0:0")
    (outside / "Q" / "q.jpg").write_bytes(b"q")
    (root / "P" / "a.jpg").write_bytes(b"a")
    (root / "P" / "passwd.jpg").symlink_to(outside / "secret.txt")  # a file link out of the root
    (root / "P" / "alias.jpg").symlink_to(root / "P" / "a.jpg")  # a link inside: followed
    (root / "Q").symlink_to(outside / "Q")  # a folder link out of the root
    (root / "P" / "again").symlink_to(root / "P")  # a loop
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "t.jpg").write_bytes(b"t")
    rows = {r["locator"]: r for r in items(FolderSource(name="f", kind="folder", root=root))}
    why = {loc: r["reason"] for loc, r in rows.items()}
    assert why == {".thumbs/": "hidden_file", "P/a.jpg": None, "P/alias.jpg": None, "P/again/": "symlink_loop",
                   "P/passwd.jpg": "outside_root", "Q/": "outside_root"}  # fmt: skip
    for loc in (".thumbs/", "P/again/", "P/passwd.jpg", "Q/"):
        assert rows[loc]["status"] == schema.DROPPED and rows[loc]["drop_stage"] == "sources" and rows[loc]["fetch_uri"] is None
    assert "root:x" not in json.dumps(list(rows.values()))
    followed = items(FolderSource(name="f", kind="folder", root=root, follow_symlinks=True))
    ok = {r["locator"]: r["fetch_uri"] for r in followed if r["reason"] is None}
    assert ok["P/passwd.jpg"] == str(root / "P" / "passwd.jpg") and "Q/q.jpg" in ok  # the recipe opted in


def test_folder_source_keeps_non_images_so_they_are_accounted_for(tmp_path):
    (tmp_path / "P").mkdir()
    (tmp_path / "P" / "notes.txt").write_text("hello")
    rows = items(FolderSource(name="f", kind="folder", root=tmp_path))
    assert [r["locator"] for r in rows] == ["P/notes.txt"]


def test_image_ids_are_stable_and_distinct_per_source(tmp_path):
    (tmp_path / "P").mkdir()
    (tmp_path / "P" / "a.jpg").write_bytes(b"")
    a = items(FolderSource(name="one", kind="folder", root=tmp_path))[0]["image_id"]
    again = items(FolderSource(name="one", kind="folder", root=tmp_path))[0]["image_id"]
    other = items(FolderSource(name="two", kind="folder", root=tmp_path))[0]["image_id"]
    assert a == again == schema.image_id("one", "P/a.jpg")
    assert a != other


def test_imdb_face_csv_layout_maps_name_and_url_and_carries_the_rest(tmp_path):
    path = tmp_path / "IMDb-Face.csv"
    path.write_text("\n".join([IMDB_HEADER, *IMDB_ROWS]) + "\n")
    rows = items(UrlSource(name="imdb", kind="urls", path=path, url_column="url", name_column="name"))
    assert [r["locator"] for r in rows] == ["http://example.org/a.jpg", "http://example.org/b.jpg"]
    assert rows[0]["label"] == "Fred Astaire"
    extra = json.loads(rows[0]["extra"])
    # carried as text, exactly as in the file (leading zeros kept)
    assert extra == {
        "row": 1,
        "index": "nm0000001_rm3343756032_1899-5-10_1968",
        "image": "nm0000001_rm3343756032_1899-5-10_1968.jpg",
        "rect": "301 96 490 285",
        "height": "0750",
        "width": "0500",
    }


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_other_list_formats(tmp_path, fmt):
    data = [{"link": "http://example.org/1.jpg", "who": "X", "score": 3}, {"link": "http://example.org/2.jpg", "who": None, "score": 4}]
    path = tmp_path / f"list.{fmt}"
    if fmt == "tsv":
        path.write_text("link\twho\tscore\n" + "\n".join(f"{d['link']}\t{d['who'] or ''}\t{d['score']}" for d in data) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(data), path)
    else:
        path.write_text("\n".join(json.dumps(d) for d in data) + "\n")
    rows = items(UrlSource(name="s", kind="urls", path=path, url_column="link", name_column="who"))
    assert [r["locator"] for r in rows] == [d["link"] for d in data]
    assert [r["label"] for r in rows] == ["X", None]
    assert json.loads(rows[1]["extra"])["score"] in (4, "4")


def test_same_url_twice_gives_two_items(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url\nhttp://example.org/a.jpg\nhttp://example.org/a.jpg\n")
    rows = items(UrlSource(name="s", kind="urls", path=path))
    assert len(rows) == 2
    assert rows[0]["image_id"] != rows[1]["image_id"]
    assert rows[0]["locator"] == rows[1]["locator"]


def test_missing_url_column_names_the_file_and_columns(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("link,name\nhttp://example.org/a.jpg,A\n")
    with pytest.raises(RecipeError) as info:
        items(UrlSource(name="s", kind="urls", path=path))
    msg = str(info.value)
    assert "url_column" in msg and "'url'" in msg and "link, name" in msg and "l.csv" in msg


def test_ragged_csv_row_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url,name\nhttp://example.org/a.jpg,A,extra,cells\n")
    with pytest.raises(RecipeError, match="line 2"):
        items(UrlSource(name="s", kind="urls", path=path))


def test_base_url_fetches_from_mirror_but_keeps_listed_locator(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url\nP/a.jpg\n\n")
    rows = items(UrlSource(name="s", kind="urls", path=path, base_url="http://127.0.0.1:8000/"))
    assert rows[0]["locator"] == "P/a.jpg"
    assert rows[0]["fetch_uri"] == "http://127.0.0.1:8000/P/a.jpg"


def test_empty_url_cell_still_becomes_an_item(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url,name\n,Nobody\n")
    rows = items(UrlSource(name="s", kind="urls", path=path, name_column="name"))
    assert len(rows) == 1 and rows[0]["locator"] == ""


def test_two_columns_of_one_name_are_refused_naming_file_and_column(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url,name,url\nhttp://example.org/a.jpg,A,http://example.org/b.jpg\n")
    with pytest.raises(RecipeError) as info:
        items(UrlSource(name="s", kind="urls", path=path))
    msg = str(info.value)
    assert "l.csv" in msg and "'url'" in msg and "more than once" in msg


def test_broken_jsonl_names_the_line_counted_from_one(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"url": "http://example.org/a.jpg"}\n{"url": "http://example.org/b.jpg"}\n{"url": oops}\n')
    with pytest.raises(RecipeError) as info:
        items(UrlSource(name="s", kind="urls", path=path))
    msg = str(info.value)
    assert "l.jsonl" in msg and "line 3" in msg and "row 2" not in msg

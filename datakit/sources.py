"""Sources: turn a recipe's sources into input items, one per file or URL row, in a fixed order.

Every item gets a stable ``image_id`` from its source name and locator (a locator repeated
within a source gets ``#2``, ``#3``... appended before hashing, so each occurrence is its own
row). Extra columns of URL lists are carried into the manifest as a JSON object, together with
the row number, so an auditor can find the line in the original file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urljoin

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from datakit import schema
from datakit.recipe import FolderSource, NamesFile, RecipeError, UrlSource

ITEM_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("source_kind", pa.string()),
        ("locator", pa.string()),
        ("label", pa.string()),
        ("extra", pa.string()),
        ("fetch_uri", pa.string()),  # absolute path or URL; not part of images.parquet
        ("status", pa.string()),
        ("drop_stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("redacted_at", pa.string()),  # set for an item an earlier build's redaction log names
        ("redaction_reason", pa.string()),
        ("person_key", pa.string()),  # the source's id for the person (VGGFace2 class id, IMDb nm id)
        ("gender", pa.string()),  # given by the source (a names file's gender column)
        ("gender_source", pa.string()),
        ("review_flag", pa.string()),  # e.g. a folder the names file does not list
        # {"box": [x0, y0, x1, y1], "frame": [width, height]}: the labelled face, for detect;
        # not part of images.parquet (the raw columns are in ``extra``)
        ("subject_hint", pa.string()),
    ]
)

# VGGFace2's m / f, and the words themselves
GENDER_WORDS = {"m": "male", "male": "male", "f": "female", "female": "female"}
PERSON_KEY = re.compile(r"^[A-Za-z0-9]+")


def iter_items(sources, recipe_path: Path | None = None) -> Iterator[dict]:
    for source in sources:
        rows = _folder_rows(source) if isinstance(source, FolderSource) else _url_rows(source, recipe_path)
        seen: dict[str, int] = {}
        for row in rows:
            n = seen.get(row["locator"], 0) + 1
            seen[row["locator"]] = n
            key = row["locator"] if n == 1 else f"{row['locator']}#{n}"
            row["image_id"] = schema.image_id(source.name, key)
            row["source"] = source.name
            row.setdefault("status", schema.KEPT)  # a folder entry not read comes dropped (see _folder_rows)
            for key in ("drop_stage", "reason", "detail"):
                row.setdefault(key, None)
            for key in ("person_key", "gender", "gender_source", "review_flag", "subject_hint"):
                row.setdefault(key, None)
            yield row


def redaction_log(path) -> list[tuple[int, dict]]:
    """(line number, record) of a redaction log (``datakit redact``'s ``redactions.jsonl``, one
    JSON object per line). A line that is not JSON is a ValueError naming file and line."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e})") from e
    return out


def read_redactions(paths) -> dict[str, dict]:
    """image_id -> {redacted_at, redaction_reason} from redaction logs. Dry runs do not count;
    an item's first redaction stands."""
    out: dict[str, dict] = {}
    for path in paths:
        try:
            records = redaction_log(path)
        except ValueError as e:
            raise RecipeError(str(e)) from e
        for n, entry in records:
            try:
                if entry.get("dry_run"):
                    continue
                for image_id in entry["image_ids"]:
                    out.setdefault(image_id, {"redacted_at": entry["time"], "redaction_reason": entry["reason"]})
            except (KeyError, TypeError, AttributeError) as e:
                raise RecipeError(f"{path} line {n}: not a redaction record ({type(e).__name__}: {e})") from e
    return out


def apply_redactions(rows: list[dict], redactions: dict[str, dict]) -> int:
    """Mark the items an earlier redaction removed: never fetched again. Returns how many."""
    marked = 0
    for row in rows:
        hit = redactions.get(row["image_id"])
        if hit is not None:
            row.update(hit, status=schema.REDACTED, fetch_uri=None,
                       detail=f"redacted {hit['redacted_at']} in an earlier build; not fetched again")  # fmt: skip
            marked += 1
    return marked


def items_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _folder_rows(source: FolderSource) -> Iterator[dict]:
    """ROOT/<label>/<file> of each root, sorted by relative path; files directly under a root
    have no label. With a names file the folder is the person key and the file gives the label
    (and gender); a folder the file does not list keeps its name, and says so in review_flag.
    An entry that is not read (a link out of the root, a hidden name) is a dropped row saying why."""
    names = read_names_file(source.names_file) if source.names_file else None
    for prefix, root in source.all_roots():
        for rel, refusal in _entries_under(root, source.extensions, source.follow_symlinks):
            locator = _readable(rel)
            parts = locator.rstrip("/").split("/")
            folder = parts[0] if len(parts) > 1 else None
            row = {
                "source_kind": "folder",
                "locator": prefix + locator,
                "label": folder,
                "extra": None,
                "fetch_uri": None if refusal else _file_uri(root / rel),
            }
            if refusal:
                row.update(status=schema.DROPPED, drop_stage=SOURCE_STAGE, reason=refusal[0], detail=refusal[1])
            if names is not None and folder is not None:
                _apply_names_entry(row, folder, names, source)
            yield row


SOURCE_STAGE = "sources"  # drop_stage of a folder entry the source does not read
OUTSIDE_ROOT = ("outside_root", "a symbolic link leading outside the source's root; not read "
                "(follow_symlinks: true on the source reads it)")  # fmt: skip
HIDDEN = ("hidden_file", "the name starts with a dot; not read")
HIDDEN_FOLDER = ("hidden_file", "a folder whose name starts with a dot; nothing in it is read")
LINK_LOOP = ("symlink_loop", "a symbolic link to a folder that contains it; not read again")


def _entries_under(root: Path, extensions: list[str] | None, follow_symlinks: bool) -> list[tuple[str, tuple | None]]:
    """(path relative to root, None or (reason, detail) when it is not read), sorted by path.

    Nothing outside the root is read unless ``follow_symlinks``: a link (file or folder) whose
    target lies outside is a refused entry, a link inside is followed (a link to a folder that
    contains it is refused, else the walk would not end). Hidden entries (a leading dot) are
    refused entries too, a hidden folder as one entry (``name/``): never silently skipped."""
    exts = {e.lower().lstrip(".") for e in extensions} if extensions else None
    real_root = os.path.realpath(root)
    found: list[tuple[str, tuple | None]] = []
    pending = [(str(root), "")]
    while pending:
        folder, rel = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as e:  # e.g. no permission: the folder is a row, the build goes on
            found.append((rel, ("file_missing", f"the folder cannot be listed: {e.strerror}")))
            continue
        for entry in entries:
            path = f"{rel}{entry.name}"
            is_dir = entry.is_dir()  # follows a link: a link to a folder is a folder here
            if not is_dir and exts is not None and entry.name.rsplit(".", 1)[-1].lower() not in exts:
                continue  # the recipe asked for these extensions only
            if entry.name.startswith("."):
                found.append((path + "/", HIDDEN_FOLDER) if is_dir else (path, HIDDEN))
            elif entry.is_symlink() and not follow_symlinks and not _inside(entry.path, real_root):
                found.append((path + "/" if is_dir else path, OUTSIDE_ROOT))
            elif is_dir and entry.is_symlink() and _inside(os.path.realpath(folder), os.path.realpath(entry.path)):
                found.append((path + "/", LINK_LOOP))
            elif is_dir:
                pending.append((entry.path, path + "/"))
            else:
                found.append((path, None))
    return sorted(found)


def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _apply_names_entry(row: dict, folder: str, names: dict[str, tuple[str, str | None]], source: FolderSource) -> None:
    row["person_key"] = folder
    entry = names.get(folder)
    if entry is None:
        row["review_flag"] = (f"folder {folder!r} has no entry in {source.names_file.path.name}; "
                              "the label is the folder name")  # fmt: skip
        return
    row["label"], gender = entry
    if gender is not None:
        row["gender"], row["gender_source"] = gender, f"source:{source.name}/{source.names_file.path.name}"


def read_names_file(spec: NamesFile) -> dict[str, tuple[str, str | None]]:
    """folder id -> (name, gender or None) from a names table such as VGGFace2's
    identity_meta.csv. Its quirks: a space after each comma, header included
    (``Class_ID, Name, ...``), and quoted names that may hold commas."""
    try:
        return _read_names(spec)
    except (csv.Error, UnicodeDecodeError) as e:
        raise RecipeError(f"{spec.path}: cannot read the names file as CSV: {e}") from e


def _read_names(spec: NamesFile) -> dict[str, tuple[str, str | None]]:
    path = spec.path
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = [h.strip() for h in next(reader, [])]
        wanted = [c for c in (spec.id_column, spec.name_column, spec.gender_column) if c]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise RecipeError(f"{path}: names file lacks column {missing[0]!r} (its columns: {', '.join(header)})")
        at = {c: header.index(c) for c in wanted}
        out: dict[str, tuple[str, str | None]] = {}
        for line_no, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) < len(header):
                raise RecipeError(f"{path} line {line_no}: {len(cells)} cells, the header has {len(header)}")
            key, name = cells[at[spec.id_column]].strip(), cells[at[spec.name_column]].strip()
            gender = None
            if spec.gender_column:
                raw = cells[at[spec.gender_column]].strip().lower()
                gender = GENDER_WORDS.get(raw)
                if raw and gender is None:
                    raise RecipeError(f"{path} line {line_no}: gender {raw!r}; expected m or f")
            out[key] = (name or key, gender)
    return out


def _readable(name: str) -> str:
    """A file name as text: a byte that is not UTF-8 (os.walk keeps it as a lone surrogate,
    which parquet and hashing refuse) is written ``\\xff``, so the name stays readable."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _file_uri(path: Path) -> str:
    """The path to read: as is when it is UTF-8, else a ``file://`` URI with the bytes
    percent-encoded (download's ``_local_path`` turns it back into those bytes)."""
    text = str(path)
    if _readable(text) == text:
        return text
    return "file://" + quote(os.fsencode(text))


def open_lists(sources, recipe_path: Path | None = None) -> dict[str, int]:
    """Read every URL list and names file as ``run`` reads them (``datakit check``): source name
    -> rows of its list (a folder source: entries of its names file). RecipeError names the file,
    the line or column and what is expected."""
    rows = {}
    for source in sources:
        if isinstance(source, UrlSource):
            rows[source.name] = read_url_table(source, recipe_path).num_rows
        elif source.names_file is not None:
            rows[source.name] = len(read_names_file(source.names_file))
    return rows


def read_url_table(source: UrlSource, recipe_path: Path | None = None) -> pa.Table:
    fmt = source.format or _format_from_suffix(source.path)
    where = f"{recipe_path}: sources[{source.name}].path" if recipe_path else str(source.path)
    try:
        if fmt in ("csv", "tsv"):
            table = _read_delimited(source.path, "\t" if fmt == "tsv" else ",")
        elif fmt == "parquet":
            table = pq.read_table(source.path)
        else:
            table = _read_jsonl(source.path)
    except (ValueError, OSError, csv.Error) as e:  # pyarrow's ArrowInvalid and UnicodeDecodeError are ValueErrors
        raise RecipeError(f"{where}: cannot read {source.path} as {fmt}: {e}") from e
    for key in ("url_column", "name_column", "person_key_column", "subject_box_column", "subject_frame_column"):
        col = getattr(source, key)
        if col is not None and col not in table.column_names:
            raise RecipeError(
                f"{where}: sources[{source.name}].{key}: column {col!r} not in {source.path} "
                f"(its columns: {', '.join(table.column_names)})"
            )
    return table


def _read_delimited(path: Path, delimiter: str) -> pa.Table:
    """Every cell as text: a URL list is text, and ids or names must not turn into numbers."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise csv.Error("the file is empty (no header row)")
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:  # one would silently win over the other
            raise csv.Error(f"column {twice[0]!r} appears more than once in the header; give each column its own name")
        columns: list[list[str | None]] = [[] for _ in header]
        try:
            for cells in reader:
                if not cells:
                    continue
                if len(cells) > len(header):
                    raise csv.Error(f"{len(cells)} cells, the header has {len(header)}")
                cells = cells + [None] * (len(header) - len(cells))
                for col, cell in zip(columns, cells):
                    col.append(cell)
        except csv.Error as e:  # e.g. a field over csv's limit (131072 characters)
            raise csv.Error(f"line {reader.line_num}: {e}") from e
    return pa.table({name: pa.array(col, pa.string()) for name, col in zip(header, columns)})


def _read_jsonl(path: Path) -> pa.Table:
    try:
        return pajson.read_json(path)
    except pa.ArrowInvalid as e:
        if not path.read_bytes().strip():
            raise ValueError("the file is empty (no JSON lines)") from e
        # pyarrow counts rows from 0 (and within a block): name the file's line, counted from 1.
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as bad:
                    raise ValueError(f"line {line_no} is not valid JSON ({bad.msg})") from e
        raise


def _url_rows(source: UrlSource, recipe_path: Path | None) -> Iterator[dict]:
    table = read_url_table(source, recipe_path)
    extra_cols = [c for c in table.column_names if c not in (source.url_column, source.name_column)]
    for i, row in enumerate(table.to_pylist()):
        raw_url = row.get(source.url_column)
        url = "" if raw_url is None else str(raw_url).strip()
        # With base_url the locator stays as listed: item ids do not depend on the mirror used.
        locator = url
        fetch_uri = urljoin(source.base_url, url) if source.base_url and url else url
        name = row.get(source.name_column) if source.name_column else None
        name = None if name is None or str(name).strip() == "" else str(name).strip()
        extra = {"row": i + 1}
        extra.update({c: _jsonable(row[c]) for c in extra_cols})
        item = {
            "source_kind": "urls",
            "locator": locator,
            "label": name,
            "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False),
            "fetch_uri": fetch_uri,
        }
        if source.person_key_column:
            key = PERSON_KEY.match(str(row.get(source.person_key_column) or "").strip())
            item["person_key"] = key.group(0) if key else None
        if source.subject_box_column:
            item["subject_hint"], item["review_flag"] = _subject_hint(
                row.get(source.subject_box_column), row.get(source.subject_frame_column), source
            )
        yield item


def _subject_hint(box_text, frame_text, source: UrlSource) -> tuple[str | None, str | None]:
    """(hint JSON, None), or (None, why) when the cells are not a box and a frame size: the
    item is still fetched and its subject chosen without the hint."""
    try:
        box = [float(v) for v in str(box_text or "").split()]
        frame = [float(v) for v in str(frame_text or "").split()]
    except ValueError:
        box, frame = [], []
    if len(box) != 4 or len(frame) != 2 or min(frame) <= 0 or box[2] <= box[0] or box[3] <= box[1]:
        return None, (f"{source.subject_box_column} {box_text!r} / {source.subject_frame_column} {frame_text!r} "
                      "is not a box x0 y0 x1 y1 in a frame 'height width'; subject chosen without it")  # fmt: skip
    height, width = frame
    return json.dumps({"box": box, "frame": [width, height]}), None


def _jsonable(v):
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    mapping = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "parquet": "parquet", "jsonl": "jsonl", "json": "jsonl"}
    if suffix not in mapping:
        raise RecipeError(f"{path}: cannot tell the format from the suffix; set format: csv|tsv|parquet|jsonl")
    return mapping[suffix]


def source_state(source, config: dict) -> dict:
    """What a source's items depend on: its settings (``config``, without a mirror's address)
    and the content of the files it reads: a URL list's and a names file's sha256, a folder's
    listing (relative path, size, modification time). Enumeration runs again when it changes."""
    from datakit.store import file_sha256

    files = {}
    if isinstance(source, FolderSource):
        if source.names_file is not None:
            files[str(source.names_file.path)] = file_sha256(source.names_file.path)[0]
        for prefix, root in source.all_roots():
            listing = hashlib.sha256()
            for rel, refusal in _entries_under(root, source.extensions, source.follow_symlinks):
                if refusal:  # an entry not read is listed by name and reason, its target never looked at
                    listing.update(f"{rel}\0{refusal[0]}\n".encode("utf-8", "surrogateescape"))
                    continue
                stat = (root / rel).stat()
                listing.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            files[f"{prefix}{root}"] = listing.hexdigest()
    else:
        files[str(source.path)] = file_sha256(source.path)[0] if source.path.exists() else None
    return {"config": config, "files": files}

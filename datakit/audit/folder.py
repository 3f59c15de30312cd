"""One build output folder, as the auditor tools see it: its files, its recipe, its shards."""

from __future__ import annotations

import json
import posixpath
import tarfile
from functools import cached_property

import pyarrow as pa

from datakit.sources import redaction_log
from datakit.store import Location, WorkDir, is_local, location, read_schema, read_table

IMAGES = "images.parquet"
IDENTITIES = "identities.parquet"
SHARDS = "shards.parquet"
MEMBERS = "shard_members.parquet"
BUILD = "build.json"
REDACTIONS = "redactions.jsonl"
AUDIT_DIR = "audit"  # where stats and report write, inside OUTPUT unless told otherwise


class AuditError(RuntimeError):
    """The output folder cannot be audited as asked; the message says which file and why."""


class OutputFolder:
    def __init__(self, root):
        self.root = location(root)  # a folder, or an fsspec URL (options from FSSPEC_* variables)
        if not self.root.is_dir():
            raise AuditError(f"{self.root}: no such folder (give the build's output folder)")
        self.work = WorkDir(self.root)

    @property
    def is_local(self) -> bool:
        return is_local(self.root)

    def path(self, name: str) -> Location:
        return self.root / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def require(self, *names: str) -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise AuditError(
                f"{self.root}: missing {', '.join(missing)}; is this a finished build's output folder?"
            )

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        self.require(name)
        if columns is not None:
            present = set(read_schema(self.path(name)).names)
            columns = [c for c in columns if c in present]
        return read_table(self.path(name), columns=columns)

    def sql_source(self, con, name: str, columns: list[str] | None = None) -> str:
        """What a duckdb query reads ``name`` from: the file itself when local; for a URL, the
        table read through fsspec and registered (duckdb's own s3 reader needs an extension)."""
        if self.is_local:
            return "read_parquet('" + str(self.path(name)).replace("'", "''") + "')"
        view = "source_" + name.replace(".", "_")
        con.register(view, self.read(name, columns))
        return view

    @cached_property
    def build(self) -> dict:
        """build.json, or {} when the folder has none (an older or partial build)."""
        if not self.has(BUILD):
            return {}
        try:
            return json.loads(self.path(BUILD).read_text())
        except json.JSONDecodeError as e:
            raise AuditError(f"{self.path(BUILD)}: not valid JSON ({e})") from e

    @property
    def recipe(self) -> dict:
        return self.build.get("recipe") or {}

    @property
    def sources(self) -> list[dict]:
        return list(self.recipe.get("sources") or [])

    def setting(self, stage: str, key: str, default=None):
        """A stage's setting as the recipe recorded it (defaults filled in by the runner)."""
        value = ((self.recipe.get("stages") or {}).get(stage) or {}).get(key)
        return default if value is None else value

    def redactions(self) -> list[dict]:
        if not self.has(REDACTIONS):
            return []
        try:
            return [record for _, record in redaction_log(self.path(REDACTIONS))]
        except ValueError as e:
            raise AuditError(str(e)) from e

    def inside(self, relative: str) -> Location:
        """OUTPUT/relative, refusing names that would leave the output folder."""
        if self.is_local:
            path = (self.root / relative).resolve()
            if not path.is_relative_to(self.root.resolve()):
                raise AuditError(f"{relative!r} (from a manifest) points outside {self.root}")
            return path
        clean = posixpath.normpath(relative)
        if clean.startswith(("/", "..")) or "://" in relative:
            raise AuditError(f"{relative!r} (from a manifest) points outside {self.root}")
        return self.root / clean


class ShardReader:
    """Reads members out of the shards named in the manifests, one open tar at a time."""

    def __init__(self, folder: OutputFolder):
        self.folder = folder
        self._name: str | None = None
        self._tar: tarfile.TarFile | None = None
        self._index: dict[str, tarfile.TarInfo] = {}

    def read(self, shard: str, member: str) -> bytes | None:
        """The member's bytes, or None when the shard or member is not there."""
        if shard != self._name:
            self.close()
            path = self.folder.inside(shard)
            if not path.is_file():
                return None
            try:
                self._tar = tarfile.open(path, "r:") if is_local(path) else tarfile.open(fileobj=path.open("rb"), mode="r:")
                self._index = {m.name: m for m in self._tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError):
                self._tar, self._index = None, {}
            self._name = shard
        info = self._index.get(member)
        if self._tar is None or info is None:
            return None
        try:
            handle = self._tar.extractfile(info)
            return handle.read() if handle else None
        except (tarfile.TarError, OSError):  # a damaged shard reads as missing; verify says why
            return None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._name, self._index = None, None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

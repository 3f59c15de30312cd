"""The download cache shared by builds (recipe key ``cache:``; ``datakit cache`` inspects and prunes).

Bytes are kept by content (``blobs/<sha256>``) and found by URL (``urls/<sha256 of the URL>.json``:
the URL, the blob's sha256 and what the server answered: status, final URL, content type). A
build into a new folder, or a source enumerated again, takes an image it fetched before from
here instead of from the web. Only images the download stage accepted are kept; a blob whose
bytes no longer match their sha256 is ignored.

A redaction purges the items' blobs and URL entries and leaves a tombstone for each sha256 and
URL (``redacted/``): a redacted image is never served from the cache and never stored again.
The cache has a size cap (``max_bytes``): after every build, and on ``datakit cache --prune``,
the least recently used blobs go first.

The cache is a folder or an fsspec URL (``s3://bucket/cache``), like a build's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from pydantic import BaseModel, ConfigDict, Field

from datakit.store import Location, atomic_write_bytes, location

DEFAULT_MAX_BYTES = 100 * 10**9


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # a folder (relative to the recipe) or an fsspec URL
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=0)


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()


class DownloadCache:
    def __init__(self, where, storage_options: dict | None = None):
        self.root: Location = location(where, storage_options)

    # paths
    def blob(self, sha256: str) -> Location:
        return self.root / "blobs" / sha256[:2] / sha256

    def entry(self, url: str) -> Location:
        key = url_key(url)
        return self.root / "urls" / key[:2] / f"{key}.json"

    def tombstone(self, kind: str, key: str) -> Location:
        return self.root / "redacted" / kind / key

    # reading and writing
    def get(self, url: str) -> dict | None:
        """{url, sha256, http_status, final_url, content_type, body} or None."""
        try:
            entry = json.loads(self.entry(url).read_text())
            if self.tombstone("url", url_key(url)).exists() or self.tombstone("sha256", entry["sha256"]).exists():
                return None
            blob = self.blob(entry["sha256"])
            body = blob.read_bytes()
        except (FileNotFoundError, ValueError, KeyError):
            return None
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            return None
        touch(blob)
        return {**entry, "body": body}

    def put(self, url: str, body: bytes, http_status: int | None, final_url: str | None, content_type: str | None) -> None:
        sha = hashlib.sha256(body).hexdigest()
        if self.tombstone("url", url_key(url)).exists() or self.tombstone("sha256", sha).exists():
            return
        blob = self.blob(sha)
        if not blob.exists():
            atomic_write_bytes(blob, body)
        record = {"url": url, "sha256": sha, "http_status": http_status, "final_url": final_url, "content_type": content_type}
        atomic_write_bytes(self.entry(url), json.dumps(record, sort_keys=True).encode())

    def purge(self, urls: list[str], sha256s: list[str]) -> int:
        """Remove these images for good and refuse them from now on. Returns blobs deleted."""
        removed = 0
        for url in urls:
            self.entry(url).unlink(missing_ok=True)
            atomic_write_bytes(self.tombstone("url", url_key(url)), url.encode("utf-8", "surrogateescape"))
        for sha in sha256s:
            blob = self.blob(sha)
            if blob.exists():
                blob.unlink()
                removed += 1
            atomic_write_bytes(self.tombstone("sha256", sha), b"")
        return removed

    # size
    def blobs(self) -> list[tuple[float, int, Location]]:
        """(last used, bytes, path) of every blob."""
        folder = self.root / "blobs"
        if not folder.exists():
            return []
        out = []
        for path in folder.glob("*/*"):
            stat = path.stat()
            out.append((stat.st_mtime if hasattr(stat, "st_mtime") else 0.0, stat.st_size, path))
        return out

    def summary(self) -> dict:
        blobs = self.blobs()
        entries = list((self.root / "urls").glob("*/*.json")) if (self.root / "urls").exists() else []
        stones = list((self.root / "redacted").glob("*/*")) if (self.root / "redacted").exists() else []
        return {"root": str(self.root), "blobs": len(blobs), "bytes": sum(b for _, b, _ in blobs), "urls": len(entries),
                "redacted": len(stones)}  # fmt: skip

    def prune(self, max_bytes: int) -> tuple[int, int]:
        """Delete the least recently used blobs until the cache holds at most ``max_bytes``; the
        URL entries of deleted blobs go too. Returns (blobs, bytes) deleted."""
        blobs = sorted(self.blobs(), key=lambda b: (b[0], str(b[2])))
        total = sum(b for _, b, _ in blobs)
        gone: set[str] = set()
        freed = 0
        for _, size, path in blobs:
            if total - freed <= max_bytes:
                break
            path.unlink(missing_ok=True)
            gone.add(path.name)
            freed += size
        if gone and (self.root / "urls").exists():
            for entry in self.root.joinpath("urls").glob("*/*.json"):
                try:
                    if json.loads(entry.read_text())["sha256"] in gone:
                        entry.unlink(missing_ok=True)
                except (ValueError, KeyError, FileNotFoundError):
                    entry.unlink(missing_ok=True)
        return len(gone), freed


def touch(path: Location) -> None:
    """Mark a blob used (its modification time orders pruning); object stores keep their own time."""
    if hasattr(path, "stat") and not hasattr(path, "protocol"):
        now = time.time()
        try:
            os.utime(path, (now, now))
        except OSError:
            pass

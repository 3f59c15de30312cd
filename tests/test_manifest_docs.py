"""manifests/README.md documents every column and reason code that datakit/schema.py defines."""

from __future__ import annotations

import re
from pathlib import Path

from datakit import schema

README = Path(__file__).resolve().parent.parent / "manifests" / "README.md"


def documented(section: str) -> set[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", body, flags=re.M))


def test_every_reason_code_is_documented():
    assert documented("Reason codes") == set(schema.REASONS)
    assert documented("Caption fallbacks") == set(schema.CAPTION_FALLBACKS)


def test_every_column_is_documented():
    assert documented("images.parquet") == set(schema.IMAGE_COLUMNS)
    assert documented("identities.parquet") == set(schema.IDENTITY_COLUMNS)
    assert documented("shards.parquet") == set(schema.SHARD_COLUMNS)
    assert documented("shard_members.parquet") == set(schema.SHARD_MEMBER_COLUMNS)

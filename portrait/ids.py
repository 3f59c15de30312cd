"""Identifiers both halves agree on: the image id of an input item and the sample key rule.

The image id names an item in ``images.parquet`` and keys its sample in the shards, so the
trainer's test data, datakit's sources and any tool that recomputes an id must use this one
function.
"""

from __future__ import annotations

import hashlib
import re

# A sample key names tar members (KEY.jpg, ...): a plain word, so no member can leave the
# shard's folder and WebDataset's "key = name up to the first dot" rule holds.
SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]{1,128}$")


def image_id(source: str, locator: str) -> str:
    """Stable id of an input item: the same source name and locator always give the same id."""
    return hashlib.sha1(f"{source}\0{locator}".encode()).hexdigest()[:16]


def check_key(key: str | None) -> str:
    """``key`` when it can name tar members, else a ValueError saying why not."""
    if not isinstance(key, str) or not SAFE_KEY.match(key):
        raise ValueError(f"key {key!r} is not a plain word of [0-9A-Za-z_-]; it cannot name tar members")
    return key

"""Identities and their samples, for Fig. 14-style sheets and the report's identity browser.

A corpus holds ~34k identities, so sheets are bounded: the identities asked for by name or id
first, then the largest identities (most kept images; ties by identity_id), up to a count; each
sheet shows an identity's first kept images in key order (the order of the shard), up to a count.
The same choice every time, so two runs over the same folder draw the same sheets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from datakit import schema
from datakit.audit.folder import IMAGES, AuditError, OutputFolder, ShardReader


@dataclass
class Identity:
    identity_id: str
    names: list[str]
    images: int

    @property
    def title(self) -> str:
        return f"{' / '.join(self.names) or '(no name)'}  [{self.identity_id}, {self.images} images]"


def normalize(name: str | None) -> str:
    """Names compare without case, with _ and spaces alike: 'Colin_Powell' == 'colin powell'."""
    return re.sub(r"\s+", " ", (name or "").replace("_", " ")).strip().casefold()


def kept_identities(folder: OutputFolder) -> list[Identity]:
    """Every identity with kept images, largest first (ties by identity_id)."""
    table = folder.read(IMAGES, columns=["status", "identity_id", "label"])
    table = table.filter(pc.and_(pc.equal(table["status"], schema.KEPT), pc.is_valid(table["identity_id"])))
    counts = table.group_by("identity_id").aggregate([([], "count_all"), ("label", "distinct")])
    out = []
    for ident, n, labels in zip(*(counts.column(c).to_pylist() for c in ("identity_id", "count_all", "label_distinct"))):
        out.append(Identity(ident, sorted(x for x in labels if x), int(n)))
    out.sort(key=lambda i: (-i.images, i.identity_id))
    return out


def find(identities: list[Identity], query: str) -> list[Identity]:
    """Identities whose id is ``query`` or one of whose names matches it."""
    q = normalize(query)
    return [i for i in identities if i.identity_id == query or any(normalize(n) == q for n in i.names)]


def choose(identities: list[Identity], wanted: list[str], limit: int | None) -> list[Identity]:
    """The identities named in ``wanted`` (each must exist), then the largest, up to ``limit``."""
    chosen: list[Identity] = []
    for query in wanted:
        hits = find(identities, query)
        if not hits:
            raise AuditError(f"no kept identity is named or has the id {query!r}")
        chosen += [h for h in hits if h not in chosen]
    for ident in identities:
        if limit is not None and len(chosen) >= limit:
            break
        if ident not in chosen:
            chosen.append(ident)
    return chosen


def kept_samples(folder: OutputFolder, identity_ids: list[str], per_identity: int | None) -> dict[str, list[dict]]:
    """identity_id -> its kept rows (key order), up to ``per_identity`` each."""
    columns = ["image_id", "status", "identity_id", "label", "source", "locator", "caption", "age", "gender", "shard", "key"]
    table = folder.read(IMAGES, columns=columns)
    mask = pc.and_(pc.equal(table["status"], schema.KEPT), pc.is_in(table["identity_id"], value_set=pa.array(identity_ids, pa.string())))
    rows = table.filter(mask).to_pylist()
    out: dict[str, list[dict]] = {i: [] for i in identity_ids}
    for row in sorted(rows, key=lambda r: (r["identity_id"], r["key"] or r["image_id"])):
        bucket = out[row["identity_id"]]
        if per_identity is None or len(bucket) < per_identity:
            bucket.append(row)
    return out


def read_images(folder: OutputFolder, rows: list[dict], member: str = "jpg") -> list[bytes | None]:
    """Each row's ``KEY.<member>`` from its shard (None when absent); shards opened in order."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["shard"] or "", rows[i]["key"] or ""))
    out: list[bytes | None] = [None] * len(rows)
    with ShardReader(folder) as reader:
        for i in order:
            row = rows[i]
            if row["shard"] and row["key"]:
                out[i] = reader.read(row["shard"], f"{row['key']}.{member}")
    return out

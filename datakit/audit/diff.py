"""``datakit diff OLD NEW``: what a change of recipe or source did to a build.

OLD and NEW are two builds' output folders (or their ``images.parquet`` files); with one
folder, its previous state (``history/``, kept by every run that changed ``images.parquet``)
against its current one. Reported: items whose status or reason changed, grouped by the old
and the new decision (stage and reason); items added and removed; identities added, removed,
merged (one new identity holds the images of several old ones) or split (one old identity's
images went to several new ones), matched by their kept images; counts per source.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from datakit.audit.folder import AuditError, OutputFolder
from datakit.engine.manifests import HISTORY
from datakit.store import location, read_table

COLUMNS = ["image_id", "source", "status", "drop_stage", "reason", "identity_id", "label"]
EXAMPLES = 5


def images_of(where) -> pa.Table:
    """images.parquet of a build folder, or the file itself."""
    path = location(where)
    if path.is_dir():
        path = path / "images.parquet"
    if not path.is_file():
        raise AuditError(f"{path}: no such file (give a build's output folder or an images.parquet)")
    have = set(read_table(path).schema.names)
    return read_table(path, columns=[c for c in COLUMNS if c in have])


def previous_state(folder: OutputFolder):
    """The latest earlier images.parquet of a build, or None."""
    history = folder.root / HISTORY
    states = sorted(history.glob("images-*.parquet")) if history.is_dir() else []
    return states[-1] if states else None


def decision(row: dict) -> str:
    if row["status"] == "dropped":
        return f"dropped {row.get('drop_stage')}/{row.get('reason')}"
    return row["status"]


def compare(old: pa.Table, new: pa.Table) -> dict:
    before = {r["image_id"]: r for r in old.to_pylist()}
    after = {r["image_id"]: r for r in new.to_pylist()}
    changed: dict[tuple[str, str], list[str]] = defaultdict(list)
    for image_id in sorted(set(before) & set(after)):
        a, b = decision(before[image_id]), decision(after[image_id])
        if a != b:
            changed[(a, b)].append(image_id)
    return {
        "items": {"old": len(before), "new": len(after),
                  "added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after))},
        "changed": [{"from": a, "to": b, "count": len(ids), "examples": ids[:EXAMPLES]}
                    for (a, b), ids in sorted(changed.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
        "identities": identity_changes(before, after),
        "sources": source_counts(before, after),
    }  # fmt: skip


def kept_groups(rows: dict[str, dict]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for image_id, r in rows.items():
        if r["status"] == "kept" and r.get("identity_id"):
            groups[r["identity_id"]].add(image_id)
    return groups


def identity_changes(before: dict, after: dict) -> dict:
    """Identities matched by the kept images they share."""
    old, new = kept_groups(before), kept_groups(after)
    old_of = {i: ident for ident, ids in old.items() for i in ids}
    new_of = {i: ident for ident, ids in new.items() for i in ids}
    sources_of_new = {ident: {old_of[i] for i in ids if i in old_of} for ident, ids in new.items()}
    targets_of_old = {ident: {new_of[i] for i in ids if i in new_of} for ident, ids in old.items()}
    label = {r["identity_id"]: r.get("label") for r in [*before.values(), *after.values()] if r.get("identity_id")}
    name = lambda ident: f"{label.get(ident) or ''} ({ident})".strip()  # noqa: E731
    return {
        "old": len(old), "new": len(new),
        "added": sorted(name(i) for i, s in sources_of_new.items() if not s),
        "removed": sorted(name(i) for i, t in targets_of_old.items() if not t),
        "merged": sorted(f"{name(i)} <- {', '.join(sorted(name(o) for o in s))}" for i, s in sources_of_new.items() if len(s) > 1),
        "split": sorted(f"{name(i)} -> {', '.join(sorted(name(n) for n in t))}" for i, t in targets_of_old.items() if len(t) > 1),
    }  # fmt: skip


def source_counts(before: dict, after: dict) -> dict:
    out = {}
    for side, rows in (("old", before), ("new", after)):
        items = Counter(r["source"] for r in rows.values())
        kept = Counter(r["source"] for r in rows.values() if r["status"] == "kept")
        for source in items:
            out.setdefault(source, {"old_items": 0, "new_items": 0, "old_kept": 0, "new_kept": 0})
            out[source][f"{side}_items"], out[source][f"{side}_kept"] = items[source], kept[source]
    return dict(sorted(out.items()))


def render_text(d: dict) -> str:
    items, ids = d["items"], d["identities"]
    lines = [f"items: {items['old']} -> {items['new']} ({len(items['added'])} added, {len(items['removed'])} removed)"]
    lines.append("decisions changed:" if d["changed"] else "decisions changed: none")
    for c in d["changed"]:
        lines.append(f"  {c['count']:>6}  {c['from']}  ->  {c['to']}   e.g. {', '.join(c['examples'])}")
    lines.append(f"identities: {ids['old']} -> {ids['new']}")
    for key in ("added", "removed", "merged", "split"):
        if ids[key]:
            lines.append(f"  {key} ({len(ids[key])}): " + "; ".join(ids[key][:20]))
    lines.append("per source (items, kept): " + "; ".join(
        f"{s}: {v['old_items']} -> {v['new_items']}, {v['old_kept']} -> {v['new_kept']}" for s, v in d["sources"].items()))
    return "\n".join(lines)


def html(d: dict, escape) -> str:
    """The report's section (``escape``: the report's HTML escaping)."""
    items, ids = d["items"], d["identities"]
    rows = "".join(f"<tr><td>{c['count']}</td><td>{escape(c['from'])}</td><td>{escape(c['to'])}</td>"
                   f"<td>{escape(', '.join(c['examples']))}</td></tr>" for c in d["changed"])
    sources = "".join(f"<tr><td>{escape(s)}</td><td>{v['old_items']} &rarr; {v['new_items']}</td>"
                      f"<td>{v['old_kept']} &rarr; {v['new_kept']}</td></tr>" for s, v in d["sources"].items())
    idents = "".join(f"<li>{key}: {escape('; '.join(ids[key][:50]))}</li>" for key in ("added", "removed", "merged", "split") if ids[key])
    return (f"<p>Items {items['old']} &rarr; {items['new']} ({len(items['added'])} added, {len(items['removed'])} removed); "
            f"identities {ids['old']} &rarr; {ids['new']}.</p>"
            "<table><thead><tr><th>items</th><th>before</th><th>now</th><th>e.g.</th></tr></thead>"
            f"<tbody>{rows or '<tr><td colspan=4>no decision changed</td></tr>'}</tbody></table>"
            f"<ul>{idents}</ul>"
            f"<table><thead><tr><th>source</th><th>items</th><th>kept</th></tr></thead><tbody>{sources}</tbody></table>")  # fmt: skip

"""Redact items from a finished build: out of the shards, the manifests and the work folder.

``redact(folder, identities=[...], urls=[...], image_ids=[...], reason=...)``:

1. Select rows of images.parquet: an identity (its id, or a name: the identities whose
   dominant label it is, compared without case, ``_`` = space) takes every row clustered into
   it and every row labelled with that name, whatever their status; a URL
   takes rows whose locator or final URL is it; an image id takes its row. Rows redacted
   before are left as they are.
2. An identity left with fewer than ``cluster.min_images`` kept images (the recipe's, default
   5) could no longer give 1 target + 4 references, which the trainer relies on; its remaining
   images are dropped too (``drop_stage`` "redact", reason ``identity_too_small``, ``detail``
   naming the redaction). They leave the shards; their bytes in the work folder stay (nobody
   asked for them to go), and the identity leaves identities.parquet.
3. Each shard that held a removed sample is rewritten without it: the other members in their
   order with their header fields unchanged (mtime 0, uid/gid 0, no names, mode 0644), USTAR,
   under a temporary name in the same folder, then renamed over the old one. Every member
   carried over is first checked against shard_members.parquet, so a damaged shard is never
   blessed with new hashes. A shard left empty is deleted. Other shards are not touched.
4. shard_members.parquet, shards.parquet, identities.parquet, then images.parquet are rewritten
   (each atomically): selected rows get status ``redacted``, ``redacted_at`` (UTC) and
   ``redaction_reason``; their embedding and landmarks (biometric templates) are cleared; all
   their other values stay, so the audit trail (source, locator, sha256, decisions) remains.
5. The work folder: every parquet file under ``_work`` that holds a selected row loses that
   row's bulk bytes (image bytes, face crops: every binary column) and its embedding and
   landmarks; the decision columns of the last stage's files carry the redaction too, so a
   later ``datakit run`` that rewrites images.parquet from ``_work`` keeps it.
6. A line is appended to OUTPUT/redactions.jsonl. Derived files that may show the images
   (OUTPUT/audit/report.html and OUTPUT/audit/sheets/) are deleted; the dataset card, if
   present, is written again with the new numbers.

images.parquet is written last, so a redaction that is interrupted is finished by running the
same command again: rows still kept are selected again, shards already rewritten no longer
hold them, and every step gives the same result twice. Before it changes anything a redaction
writes OUTPUT/.redact-pending.json (what it was asked, when); the file goes once the log line
is written. A run that finds it says that it finishes an interrupted redaction (and keeps that
one's time), or, asked for something else, refuses until that one is run again.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datakit import registry, schema
from datakit.audit.folder import AUDIT_DIR, IDENTITIES, IMAGES, MEMBERS, REDACTIONS, SHARDS, AuditError, OutputFolder
from datakit.audit.sheets import normalize
from datakit.engine.manifests import identities_table, write_table
from datakit.engine.settle import clear_columns, redact_rows
from datakit.store import TMP_PREFIX, atomic_write_json, atomic_write_table, file_sha256
from portrait import shardio

# What a redacted row must not keep: the biometric templates, and the perceptual hashes that
# would still find the photo (or its mirror image) anywhere it is published.
CLEARED_COLUMNS = ("embedding", "landmarks5", "landmarks68", "phash", "phash_mirror")
REDACT_STAGE = "redact"
PENDING = ".redact-pending.json"  # a redaction under way (see the module docstring)


@dataclass
class Plan:
    redact: list[str]  # image ids to mark redacted
    also_drop: dict[str, str] = field(default_factory=dict)  # image id -> detail (identity too small)
    already: list[str] = field(default_factory=list)  # selected but redacted before
    removed_samples: dict[str, set[str]] = field(default_factory=dict)  # shard -> keys leaving it
    identities: set[str] = field(default_factory=set)  # identities that lose images


@dataclass
class Result:
    time: str
    reason: str
    selector: dict
    image_ids: list[str]
    also_dropped: list[str]
    already_redacted: list[str]
    shards_rewritten: list[str]
    shards_removed: list[str]
    work_files_scrubbed: int
    derived_files_removed: list[str]
    user: str
    dry_run: bool = False
    finished_interrupted: str | None = None  # the time of an interrupted redaction this run finished

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("finished_interrupted")  # not part of the log record
        return data



# ---------------------------------------------------------------- selection


def select(folder: OutputFolder, identities=(), urls=(), image_ids=()) -> tuple[list[str], list[str]]:
    """(image ids to redact, image ids already redacted) for the selectors; unknown ones raise.

    A name takes the identities whose dominant label it is (not every identity that holds one
    image filed under that name: such an image is taken on its own) and every row labelled with it.
    """
    cols = ["image_id", "status", "identity_id", "label", "locator", "final_url"]
    t = folder.read(IMAGES, columns=cols).to_pylist()
    chosen: list[str] = []

    def take(rows, what):
        if not rows:
            raise AuditError(f"{what}: no row of images.parquet matches; nothing was changed")
        chosen.extend(r["image_id"] for r in rows)

    dominant = dominant_labels(t)
    for query in identities:
        q = normalize(query)
        idents = {i for i, label in dominant.items() if i == query or label == q}
        take([r for r in t if r["identity_id"] in idents or normalize(r["label"]) == q], f"identity {query!r}")
    for u in urls:
        take([r for r in t if u in (r["locator"], r["final_url"])], f"URL {u!r}")
    for i in image_ids:
        take([r for r in t if r["image_id"] == i], f"image id {i!r}")
    status = {r["image_id"]: r["status"] for r in t}
    unique = list(dict.fromkeys(chosen))
    return [i for i in unique if status[i] != schema.REDACTED], [i for i in unique if status[i] == schema.REDACTED]


def dominant_labels(rows: list[dict]) -> dict[str, str]:
    """identity_id -> the (normalized) label most of its rows carry."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if r["identity_id"] and r["label"]:
            counts[r["identity_id"]][normalize(r["label"])] += 1
    return {ident: c.most_common(1)[0][0] for ident, c in counts.items()}


def plan(
    folder: OutputFolder, redact_ids: list[str], already: list[str], min_images: int,
    identities: frozenset[str] = frozenset(), dropped: dict[str, str] | None = None,
) -> Plan:
    """``identities`` and ``dropped``: what an interrupted run of this redaction already marked in
    images.parquet (the identities it touched, the images it dropped as identity_too_small)."""
    rows = folder.read(IMAGES, columns=["image_id", "status", "identity_id", "shard", "key"]).to_pylist()
    targets = set(redact_ids)
    p = Plan(redact=list(redact_ids), already=list(already), also_drop=dict(dropped or {}))
    kept = [r for r in rows if r["status"] == schema.KEPT]
    p.identities = {r["identity_id"] for r in kept if r["image_id"] in targets and r["identity_id"]} | set(identities)
    left = Counter(r["identity_id"] for r in kept if r["image_id"] not in targets and r["identity_id"] in p.identities)
    for r in kept:
        ident = r["identity_id"]
        if r["image_id"] not in targets and ident in p.identities and left[ident] < min_images:
            p.also_drop[r["image_id"]] = (
                f"identity {ident} was left with {left[ident]} images (cluster.min_images is {min_images}) "
                f"after a redaction; the images were not redacted themselves"
            )
    leaving = targets | set(p.also_drop)
    for r in rows:
        if r["image_id"] in leaving and r["shard"] and r["key"]:
            p.removed_samples.setdefault(r["shard"], set()).add(r["key"])
    if folder.has(MEMBERS):  # also wherever the member list says a sample of theirs is
        members = folder.read(MEMBERS, columns=["shard", "key"])
        hit = members.filter(pc.is_in(members["key"], value_set=pa.array(sorted(leaving), pa.string())))
        for shard, key in zip(hit["shard"].to_pylist(), hit["key"].to_pylist()):
            p.removed_samples.setdefault(shard, set()).add(key)
    return p


# ---------------------------------------------------------------- the whole operation


def redact(
    folder: OutputFolder,
    reason: str,
    identities=(),
    urls=(),
    image_ids=(),
    dry_run: bool = False,
    now: float | None = None,
) -> Result:
    if not reason or not reason.strip():
        raise AuditError("a redaction needs a reason (--reason TEXT): it is kept in the manifests and the log")
    if not (identities or urls or image_ids):
        raise AuditError("say what to redact: --identity NAME, --url URL or --image-id ID")
    folder.require(IMAGES)
    if not folder.is_local:
        raise AuditError(
            f"{folder.root}: redact rewrites shards and manifests in place under a file lock, which an object "
            "store cannot give; run it on a local or mounted copy of the build (e.g. `aws s3 sync`), then sync back"
        )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    selector = {"identity": list(identities), "url": list(urls), "image_id": list(image_ids)}
    with _lock(folder):
        interrupted = _interrupted(folder, selector, reason)
        if interrupted is not None and not dry_run:
            stamp = interrupted["time"]  # the redaction it finishes keeps its time
        ids, already = select(folder, identities, urls, image_ids)
        touched, dropped = frozenset(), {}
        if interrupted is not None:  # the rows it marked already: every step again, the same result
            mine, touched, dropped = _marked_by(folder, already, stamp)
            ids, already = ids + mine, [i for i in already if i not in set(mine)]
        p = plan(folder, ids, already, int(folder.setting("cluster", "min_images", 5)), touched, dropped)
        result = Result(
            time=stamp, reason=reason, selector=selector,
            image_ids=p.redact, also_dropped=sorted(p.also_drop), already_redacted=p.already, shards_rewritten=[],
            shards_removed=[], work_files_scrubbed=0, derived_files_removed=[], user=_user(), dry_run=dry_run,
        )  # fmt: skip
        if dry_run or (not p.redact and interrupted is None):
            return result
        if interrupted is None:
            atomic_write_json(folder.path(PENDING), {"time": stamp, "reason": reason, "selector": selector})
        else:
            result.finished_interrupted = interrupted["time"]
        rewritten = rewrite_shards(folder, p.removed_samples, resuming=interrupted is not None)
        result.shards_rewritten = sorted(r for r, info in rewritten.items() if info is not None)
        result.shards_removed = sorted(r for r, info in rewritten.items() if info is None)
        update_shard_manifests(folder, p, rewritten)
        purge_cache(folder, p.redact)
        images = update_images(folder, p, reason, stamp)
        update_identities(folder, images, p.identities)
        result.work_files_scrubbed = scrub_work(folder, p, reason, stamp)
        result.derived_files_removed = remove_derived(folder)
        if not _logged(folder, result):
            append_log(folder, result)
        refresh_card(folder)
        folder.path(PENDING).unlink(missing_ok=True)
    return result


def _marked_by(folder: OutputFolder, ids: list[str], stamp: str) -> tuple[list[str], frozenset[str], dict[str, str]]:
    """What an interrupted run of the redaction stamped ``stamp`` wrote into images.parquet: the
    rows of ``ids`` it redacted, their identities, and the rows it dropped with them
    (identity_too_small, with the detail it wrote); identities.parquet and the work folder may
    not have them yet."""
    cols = ["image_id", "identity_id", "redacted_at", "drop_stage", "reason", "detail"]
    rows = folder.read(IMAGES, columns=cols).to_pylist()
    at = {r["image_id"]: r["redacted_at"] for r in rows}
    mine = [i for i in ids if at.get(i) == stamp]
    marked = set(mine)
    touched = frozenset(r["identity_id"] for r in rows if r["image_id"] in marked and r["identity_id"])
    dropped = {
        r["image_id"]: r["detail"] for r in rows
        if r["identity_id"] in touched and r["image_id"] not in marked
        and r["drop_stage"] == REDACT_STAGE and r["reason"] == "identity_too_small"
    }  # fmt: skip
    return mine, touched, dropped


def _logged(folder: OutputFolder, result: Result) -> bool:
    """The log's last line is this redaction already (interrupted after it was written)."""
    if not folder.has(REDACTIONS):
        return False
    lines = folder.path(REDACTIONS).read_text(encoding="utf-8").strip().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return (last.get("time"), last.get("selector"), last.get("reason")) == (result.time, result.selector, result.reason)


def _interrupted(folder: OutputFolder, selector: dict, reason: str) -> dict | None:
    """The record of a redaction that was interrupted, when it is the one asked for again."""
    if not folder.has(PENDING):
        return None
    pending = json.loads(folder.path(PENDING).read_text())
    if pending["selector"] != selector or pending["reason"] != reason:
        asked = " ".join(f"--{k.replace('_', '-')} {v!r}" for k, values in pending["selector"].items() for v in values)
        raise AuditError(
            f"{folder.root}: a redaction started {pending['time']} was interrupted ({asked} --reason {pending['reason']!r}); "
            "run that command again to finish it first"
        )
    return pending


def purge_cache(folder: OutputFolder, ids: list[str]) -> int:
    """The redacted images leave the build's download cache (recipe key ``cache``) and are
    never served from it or stored in it again."""
    spec = folder.recipe.get("cache")
    if not spec:
        return 0
    from datakit.cache import DownloadCache

    chosen = set(ids)
    rows = [r for r in folder.read(IMAGES, ["image_id", "locator", "final_url", "sha256"]).to_pylist() if r["image_id"] in chosen]
    urls = sorted({u for r in rows for u in (r.get("locator"), r.get("final_url")) if u})
    return DownloadCache(spec["path"]).purge(urls, sorted({r["sha256"] for r in rows if r.get("sha256")}))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


@contextmanager
def _lock(folder: OutputFolder):
    """One redaction at a time per output folder."""
    with open(folder.path(".redact.lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise AuditError(f"{folder.root}: another redaction is running (it holds .redact.lock)") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- shards


def rewrite_shards(folder: OutputFolder, removed: dict[str, set[str]], resuming: bool = False) -> dict[str, dict | None]:
    """Rewrite each shard without ``removed[shard]``; shard -> {bytes, sha256} (None: deleted).
    ``resuming`` an interrupted redaction, a missing shard is one it left empty and deleted."""
    expected = _member_hashes(folder)
    out = {}
    for shard in sorted(removed):
        path = folder.inside(shard)
        if not path.is_file() and resuming:
            out[shard] = None
            continue
        if not path.is_file():
            raise AuditError(f"{shard}: the shard is missing, so its samples cannot be removed; run `datakit verify`")
        out[shard] = rewrite_tar(path, shard, removed[shard], expected.get(shard, {}))
    return out


def _member_hashes(folder: OutputFolder) -> dict[str, dict[str, str]]:
    if not folder.has(MEMBERS):
        return {}
    out: dict[str, dict[str, str]] = defaultdict(dict)
    t = folder.read(MEMBERS, columns=["shard", "member", "sha256"])
    for shard, member, sha in zip(*(t[c].to_pylist() for c in ("shard", "member", "sha256"))):
        out[shard][member] = sha
    return out


def rewrite_tar(path: Path, shard: str, keys: set[str], expected: dict[str, str]) -> dict | None:
    """The shard without the samples ``keys``, written by the shard stage's writer
    (portrait.shardio), so the members carried over keep their bytes and headers."""
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    kept = 0
    try:
        with shardio.TarWriter(tmp) as dst:
            for member in shardio.read_members(path):
                if member.key in keys:
                    continue
                if member.data is None:
                    raise AuditError(f"{shard}: member {member.name!r} is not a plain file; run `datakit verify`")
                if expected and hashlib.sha256(member.data).hexdigest() != expected.get(member.name):
                    raise AuditError(
                        f"{shard}: member {member.name} does not match shard_members.parquet; the shard is damaged "
                        f"or the manifests are stale. Run `datakit verify {path.parent.parent}` and fix that first."
                    )
                dst.write(member.name, member.data)
                kept += 1
        if kept == 0:
            tmp.unlink()
            path.unlink()
            return None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = file_sha256(tmp)
        os.replace(tmp, path)
        return {"bytes": size, "sha256": digest}
    except (tarfile.TarError, EOFError) as e:
        raise AuditError(f"{shard}: cannot be read as a tar ({e}); run `datakit verify`") from e
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- manifests


def update_shard_manifests(folder: OutputFolder, p: Plan, rewritten: dict[str, dict | None]) -> None:
    if not folder.has(SHARDS):
        return
    leaving = set(p.redact) | set(p.also_drop)
    members = folder.read(MEMBERS) if folder.has(MEMBERS) else None
    if members is not None:
        gone = pc.and_(pc.is_in(members["shard"], value_set=pa.array(sorted(rewritten), pa.string())),
                       pc.is_in(members["key"], value_set=pa.array(sorted(leaving), pa.string())))  # fmt: skip
        members = members.filter(pc.invert(gone))
        write_table(folder.root, MEMBERS, members)
    images = folder.read(IMAGES, columns=["image_id", "status", "identity_id"]).to_pylist()
    identity_of = {r["image_id"]: r["identity_id"] for r in images if r["status"] == schema.KEPT and r["image_id"] not in leaving}
    keys_in: dict[str, set[str]] = defaultdict(set)
    if members is not None:
        for shard, key in zip(members["shard"].to_pylist(), members["key"].to_pylist()):
            keys_in[shard].add(key)
    rows = []
    for row in folder.read(SHARDS).to_pylist():
        if row["path"] in rewritten:
            info = rewritten[row["path"]]
            if info is None:
                continue
            keys = keys_in[row["path"]]
            row.update(info, samples=len(keys), identities=len({identity_of.get(k) for k in keys if identity_of.get(k)}))
        rows.append(row)
    write_table(folder.root, SHARDS, pa.Table.from_pylist(rows, schema=folder.read(SHARDS).schema))


def update_images(folder: OutputFolder, p: Plan, reason: str, stamp: str) -> pa.Table:
    table = redact_rows(folder.read(IMAGES), set(p.redact), p.also_drop, reason, stamp, REDACT_STAGE)
    mask = pa.array([image in set(p.redact) for image in table["image_id"].to_pylist()])
    table = clear_columns(table, mask, CLEARED_COLUMNS)
    write_table(folder.root, IMAGES, table)
    return table


def update_identities(folder: OutputFolder, images: pa.Table, affected: set[str]) -> None:
    """Recount the identities from the redacted images.parquet, as the build counted them."""
    if not folder.has(IDENTITIES) or not affected:
        return
    write_table(folder.root, IDENTITIES, identities_table(images))


# ---------------------------------------------------------------- work folder


def scrub_work(folder: OutputFolder, p: Plan, reason: str, stamp: str) -> int:
    """Clear the redacted rows' bytes and templates in every _work parquet; returns files changed."""
    root = folder.work.root
    if not root.is_dir():
        return 0
    targets = pa.array(sorted(p.redact), pa.string())
    last = _last_stage(folder)
    changed = 0
    for path in sorted(root.rglob("*.parquet")):
        if path.name.startswith(TMP_PREFIX):
            continue
        names = pq.read_schema(path).names
        id_col = "image_id" if "image_id" in names else "key" if "key" in names else None
        if id_col is None:
            continue
        ids = pq.read_table(path, columns=[id_col])[id_col]
        mask = pc.fill_null(pc.is_in(ids, value_set=targets), False)
        is_last = last is not None and path.parent == folder.work.stage_dir(last) and path.name.startswith("part-")
        if not pc.any(mask).as_py() and not (is_last and _touches(ids, p.also_drop)):
            continue
        table = pq.read_table(path)
        bulky = [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        table = clear_columns(table, mask, [*bulky, *CLEARED_COLUMNS])
        if is_last:  # what images.parquet is made from carries the redaction too
            table = redact_rows(table, set(p.redact), p.also_drop, reason, stamp, REDACT_STAGE)
        atomic_write_table(path, table)
        changed += 1
    return changed


def _touches(ids: pa.ChunkedArray, also_drop: dict) -> bool:
    return bool(also_drop) and pc.any(pc.is_in(ids, value_set=pa.array(sorted(also_drop), pa.string()))).as_py()


def _last_stage(folder: OutputFolder) -> str | None:
    done = [s for s in registry.STEPS if folder.work.stage_dir(s).is_dir()]
    return done[-1] if done else None


# ---------------------------------------------------------------- log and derived files


def append_log(folder: OutputFolder, result: Result) -> None:
    line = json.dumps(result.to_json(), sort_keys=True, ensure_ascii=False) + "\n"
    with open(folder.path(REDACTIONS), "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def remove_derived(folder: OutputFolder) -> list[str]:
    """Audit outputs that embed images (the report, the sheets) would still show the person."""
    removed = []
    audit = folder.path(AUDIT_DIR)
    for rel in ("report.html", "sheets"):
        path = audit / rel
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(f"{AUDIT_DIR}/{rel}")
        elif path.is_file():
            path.unlink()
            removed.append(f"{AUDIT_DIR}/{rel}")
    return removed


def refresh_card(folder: OutputFolder) -> None:
    if folder.has("README.md"):
        from datakit.audit.card import write_card

        write_card(folder)

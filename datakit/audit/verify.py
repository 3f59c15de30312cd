"""Verify a build's shards against its manifests: every byte re-hashed, every sample accounted for.

One streaming pass per tar hashes the whole file and each member at once. Then four checks:

0. Manifests: each manifest file has the sha256 build.json recorded when the build (or a
   redaction) wrote it, so a row edited afterwards (a caption, a label, a sha256) is caught.

1. Files: each shard in shards.parquet exists, has its size and sha256; no tar under shards/
   is unlisted; no shard is listed twice or has the same content as another.
2. Members: each member in shard_members.parquet is in its tar with its size and sha256; no tar
   holds an unlisted, repeated or unsafe member (not a plain file, or a name with a folder).
3. Samples: every kept row of images.parquet has its shard/key in the shards exactly once, with
   every member the sample needs, each readable as ``portrait.sample`` defines it (the trainer's
   reader skips a sample exactly when this check fails); no dropped or redacted image (and no
   unknown key) is in any shard; the sample and identity counts of shards.parquet and
   identities.parquet match; each kept row says what its sample's JSON says (SAMPLE_FIELDS).

Each problem has a kind (PROBLEMS), the shard, key and member it concerns, and plain words.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path


from datakit import schema
from datakit.audit.folder import BUILD, IDENTITIES, IMAGES, MEMBERS, SHARDS, OutputFolder
from datakit.engine.manifests import MANIFEST_FILES
from datakit.store import TMP_PREFIX, file_sha256
from portrait import sample, shardio

SHARDS_DIR = "shards"
REQUIRED_MEMBERS = sample.REQUIRED_MEMBERS

PROBLEMS = {
    "missing_shard": "a shard listed in shards.parquet is not on disk",
    "truncated_shard": "the shard file is shorter than shards.parquet says",
    "size_mismatch": "the shard file is longer than shards.parquet says",
    "corrupted_shard": "the shard's sha256 differs from shards.parquet",
    "unreadable_shard": "the shard cannot be read as a tar to its end",
    "extra_shard": "a tar under shards/ that shards.parquet does not list",
    "duplicate_shard": "shards.parquet lists a path twice, or two shards have the same content",
    "temporary_file": "a half-written temporary file left under shards/ by an interrupted writer",
    "missing_member": "a member listed in shard_members.parquet is not in its tar",
    "corrupted_member": "a member's size or sha256 differs from shard_members.parquet",
    "extra_member": "a tar member that shard_members.parquet does not list",
    "duplicate_member": "a member name occurs more than once in a tar",
    "unsafe_member": "a member that is not a plain file or whose name has a folder in it",
    "missing_sample": "a kept image has no sample at its shard/key",
    "duplicate_sample": "a sample key is in more than one place, or kept rows share a shard/key",
    "incomplete_sample": "a sample lacks a required member (.jpg, .face.jpg, .json, .embedding.npy, .landmarks.npy)",
    "invalid_sample": "a member's content is not what the sample format says (the trainer would skip the sample)",
    "redacted_sample": "a redacted image is still in a shard",
    "unexpected_sample": "a sample whose image is not kept (dropped, or not in images.parquet)",
    "manifest_mismatch": "the manifests disagree with the shards (counts, unknown shards)",
    "manifest_changed": "a manifest's sha256 differs from the one build.json recorded (changed after the build wrote it)",
    "manifest_unrecorded": "build.json records no sha256 for a manifest (no build.json, or an older build), so it cannot be checked",
    "sample_mismatch": "a kept row of images.parquet and its sample's JSON disagree (label, caption, identity, ...)",
}

# images.parquet column -> how the sample's JSON holds it (the shard stage rounds age to 2 decimals)
SAMPLE_FIELDS = {
    "identity_id": str, "label": str, "source": str, "locator": str, "gender": str, "caption": str,
    "age": lambda v: round(float(v), 2),
}  # fmt: skip


@dataclass
class Problem:
    kind: str
    shard: str | None = None
    key: str | None = None
    member: str | None = None
    detail: str = ""

    def line(self) -> str:
        where = " ".join(x for x in (self.shard, self.key and f"key {self.key}", self.member and f"member {self.member}") if x)
        return f"{self.kind}: {where}{': ' if where and self.detail else ''}{self.detail}"


@dataclass
class Report:
    shards_checked: int = 0
    members_checked: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "shards_checked": self.shards_checked,
            "members_checked": self.members_checked,
            "bytes_read": self.bytes_read,
            "counts": self.counts(),
            "problems": [asdict(p) for p in self.problems],
        }


@dataclass
class Scan:
    """What one pass over a tar found."""

    path: str
    exists: bool = True
    size: int = 0
    sha256: str | None = None
    members: list[tuple[str, int, str, bool]] = field(default_factory=list)  # name, size, sha256, is a file
    invalid: dict[str, str] = field(default_factory=dict)  # key -> why its content is unusable
    meta: dict[str, dict] = field(default_factory=dict)  # key -> its JSON's SAMPLE_FIELDS
    error: str | None = None


class _HashingReader:
    """A file wrapper that hashes and counts every byte the tar reader pulls through it."""

    def __init__(self, f):
        self.f, self.digest, self.count = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def scan_tar(path: Path, rel: str) -> Scan:
    scan = Scan(rel)
    if not path.is_file():
        scan.exists = False
        return scan
    with path.open("rb") as f:
        reader = _HashingReader(f)
        members = _recorded(shardio.read_members(reader), scan)
        try:
            for key, content in shardio.read_samples(members):
                problems = sample.validate(key, content, check_members=False)  # absent members: incomplete_sample
                if problems:
                    scan.invalid[key] = "; ".join(problems)
                elif "json" in content:
                    meta = json.loads(content["json"])
                    scan.meta[key] = {name: meta.get(name) for name in SAMPLE_FIELDS}
        except (tarfile.TarError, OSError, EOFError) as e:
            scan.error = f"{type(e).__name__}: {e}"
        reader.drain()  # the padding after the end-of-archive blocks counts in the file's hash
        scan.size, scan.sha256 = reader.count, reader.digest.hexdigest()
    return scan


def _recorded(members, scan: Scan):
    """Pass members through, noting each one's name, size and sha256 in ``scan``."""
    for m in members:
        if m.data is None:
            scan.members.append((m.name, 0, "", False))
        else:
            scan.members.append((m.name, len(m.data), hashlib.sha256(m.data).hexdigest(), True))
        yield m


def verify(folder: OutputFolder, jobs: int = 2, progress: bool = False) -> Report:
    folder.require(IMAGES, SHARDS, MEMBERS)
    shards = folder.read(SHARDS).to_pylist()
    members = folder.read(MEMBERS).to_pylist()
    images = folder.read(IMAGES, columns=["image_id", "status", "shard", "key", *SAMPLE_FIELDS]).to_pylist()
    report = Report()
    problems = report.problems
    problems += check_manifest_hashes(folder)

    listed = Counter(s["path"] for s in shards)
    problems += [Problem("duplicate_shard", p, detail=f"listed {n} times in shards.parquet") for p, n in listed.items() if n > 1]
    on_disk = find_tars(folder)
    problems += [Problem("temporary_file", rel, detail="left by an interrupted writer; delete it") for rel in on_disk if _is_temp(rel)]
    extra = sorted(rel for rel in on_disk if rel not in listed and not _is_temp(rel))

    paths = list(listed) + extra
    scans = scan_all(folder, paths, jobs, progress)
    report.shards_checked = sum(1 for s in scans.values() if s.exists)
    report.bytes_read = sum(s.size for s in scans.values())
    report.members_checked = sum(len(s.members) for s in scans.values())

    by_sha = defaultdict(list)
    for row in {s["path"]: s for s in shards}.values():
        problems += check_file(row, scans[row["path"]])
        if scans[row["path"]].exists:
            by_sha[scans[row["path"]].sha256].append(row["path"])
    for rel in extra:
        twin = by_sha.get(scans[rel].sha256)
        problems.append(Problem("extra_shard", rel, detail=f"not in shards.parquet{f'; a copy of {twin[0]}' if twin else ''}"))
    for sha, rels in by_sha.items():
        if len(rels) > 1:
            problems.append(Problem("duplicate_shard", rels[1], detail=f"same content (sha256 {sha[:12]}) as {rels[0]}"))

    problems += check_members(members, scans, set(listed))
    problems += check_samples(folder, images, shards, scans, set(listed))
    return report


def check_manifest_hashes(folder: OutputFolder) -> list[Problem]:
    recorded = folder.build.get("manifests", {})
    out = []
    for name in MANIFEST_FILES:
        if not folder.has(name):
            continue  # a required one missing is an error before this; identities.parquet is optional
        if name not in recorded:
            out.append(Problem("manifest_unrecorded", name, detail=f"{BUILD} records no sha256 for it"))
            continue
        digest = file_sha256(folder.path(name))[0]
        if digest != recorded[name]:
            out.append(Problem("manifest_changed", name,
                               detail=f"sha256 {digest[:16]}..., {BUILD} recorded {recorded[name][:16]}...: changed since the build wrote it"))  # fmt: skip
    return out


def find_tars(folder: OutputFolder) -> list[str]:
    base = folder.path(SHARDS_DIR)
    if not base.is_dir():
        return []
    found = [p for p in base.rglob("*") if p.is_file() and (p.suffix == ".tar" or p.name.startswith(TMP_PREFIX))]
    return sorted(f"{SHARDS_DIR}/{p.relative_to(base).as_posix()}" for p in found)


def _is_temp(rel: str) -> bool:
    return Path(rel).name.startswith(TMP_PREFIX)


def scan_all(folder: OutputFolder, paths: list[str], jobs: int, progress: bool) -> dict[str, Scan]:
    from tqdm import tqdm

    def one(rel: str) -> Scan:
        return scan_tar(folder.inside(rel), rel)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # hashing releases the GIL
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc="verify: shards", disable=not progress, leave=False))
    return {s.path: s for s in results}


def check_file(row: dict, scan: Scan) -> list[Problem]:
    rel = row["path"]
    if not scan.exists:
        return [Problem("missing_shard", rel, detail=f"expected {row['bytes']} bytes")]
    out = []
    if scan.size < row["bytes"]:
        out.append(Problem("truncated_shard", rel, detail=f"{scan.size} bytes on disk, {row['bytes']} expected"))
    elif scan.size > row["bytes"]:
        out.append(Problem("size_mismatch", rel, detail=f"{scan.size} bytes on disk, {row['bytes']} expected"))
    if scan.sha256 != row["sha256"]:
        out.append(Problem("corrupted_shard", rel, detail=f"sha256 {scan.sha256[:16]}..., expected {row['sha256'][:16]}..."))
    if scan.error:
        out.append(Problem("unreadable_shard", rel, detail=f"the tar stops being readable: {scan.error}"))
    return out


def check_members(members: list[dict], scans: dict[str, Scan], listed: set[str]) -> list[Problem]:
    out = []
    expected: dict[str, dict[str, dict]] = defaultdict(dict)
    for m in members:
        if m["shard"] not in listed:
            out.append(Problem("manifest_mismatch", m["shard"], m["key"], m["member"], "shard_members.parquet names a shard that shards.parquet does not list"))
            continue
        if m["member"] in expected[m["shard"]]:
            out.append(Problem("duplicate_member", m["shard"], m["key"], m["member"], "listed twice in shard_members.parquet"))
        expected[m["shard"]][m["member"]] = m
    for rel in sorted(listed):
        scan = scans[rel]
        if not scan.exists:
            continue  # reported once as missing_shard; its samples are reported below
        want = expected.get(rel, {})
        seen = Counter(name for name, *_ in scan.members)
        for name, size, sha, is_file in scan.members:
            key = _key(name)
            if not is_file or not shardio.is_safe_name(name):
                out.append(Problem("unsafe_member", rel, key, name, "not a plain file, or its name could leave the folder"))
                continue
            if seen[name] > 1:
                out.append(Problem("duplicate_member", rel, key, name, f"occurs {seen[name]} times in the tar"))
                seen[name] = 1  # report once
            m = want.get(name)
            if m is None:
                out.append(Problem("extra_member", rel, key, name, "not in shard_members.parquet"))
            elif m["sha256"] != sha or m["bytes"] != size:
                out.append(Problem("corrupted_member", rel, key, name, f"{size} bytes, sha256 {sha[:12]}...; expected {m['bytes']} bytes, {m['sha256'][:12]}..."))
        present = set(seen)
        cut = " (the tar is damaged before it)" if scan.error else ""
        for name, m in sorted(want.items()):
            if name not in present:
                out.append(Problem("missing_member", rel, m["key"], name, f"listed in shard_members.parquet, not in the tar{cut}"))
    return out


def _key(member: str) -> str:
    return shardio.split_name(member)[0]


def _suffix(member: str) -> str:
    return shardio.split_name(member)[1]


def check_samples(folder: OutputFolder, images: list[dict], shards: list[dict], scans: dict[str, Scan], listed: set[str]) -> list[Problem]:
    out = []
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # key -> shard -> suffixes
    for rel, scan in scans.items():
        if rel in listed:
            for name, _, _, is_file in scan.members:
                if is_file:
                    found[_key(name)][rel].add(_suffix(name))
    status_of = {r["image_id"]: r["status"] for r in images}
    kept_at = Counter((r["shard"], r["key"]) for r in images if r["status"] == schema.KEPT)
    for (shard, key), n in kept_at.items():
        if shard is None or key is None:
            out += [Problem("missing_sample", shard, key, detail=f"{n} kept row(s) have no shard/key")]
        elif n > 1:
            out.append(Problem("duplicate_sample", shard, key, detail=f"{n} kept rows of images.parquet share this shard/key"))
    for r in images:
        if r["status"] != schema.KEPT or r["shard"] is None or r["key"] is None:
            continue
        places = found.get(r["key"], {})
        if r["shard"] not in places:
            why = "its shard is missing" if not scans.get(r["shard"], Scan("", exists=False)).exists else "not in its shard"
            elsewhere = [s for s in places if s != r["shard"]]
            out.append(Problem("missing_sample", r["shard"], r["key"], detail=why + (f"; found in {elsewhere[0]}" if elsewhere else "")))
        else:
            lacking = [s for s in REQUIRED_MEMBERS if s not in places[r["shard"]]]
            if lacking:
                out.append(Problem("incomplete_sample", r["shard"], r["key"], detail="lacks " + ", ".join(f".{s}" for s in lacking)))
            invalid = scans[r["shard"]].invalid.get(r["key"])
            if invalid:
                out.append(Problem("invalid_sample", r["shard"], r["key"], detail=invalid))
            meta = scans[r["shard"]].meta.get(r["key"])
            if meta is not None:
                out += [Problem("sample_mismatch", r["shard"], r["key"], f"{r['key']}.json", d) for d in _disagreements(r, meta)]
    expected_place = {(r["shard"], r["key"]) for r in images if r["status"] == schema.KEPT}
    for key, places in sorted(found.items()):
        if len(places) > 1:
            out.append(Problem("duplicate_sample", sorted(places)[1], key, detail=f"in {len(places)} shards: {', '.join(sorted(places))}"))
        for shard in sorted(places):
            if (shard, key) in expected_place:
                continue
            status = status_of.get(key)
            if status == schema.REDACTED:
                out.append(Problem("redacted_sample", shard, key, detail="redacted in images.parquet but still in the shard"))
            elif status is None:
                out.append(Problem("unexpected_sample", shard, key, detail="no row of images.parquet has this image_id"))
            elif status != schema.KEPT:
                out.append(Problem("unexpected_sample", shard, key, detail=f"its row is {status}"))
    out += check_counts(folder, images, shards, found, listed)
    return out


def _disagreements(row: dict, meta: dict) -> list[str]:
    out = []
    for name, form in SAMPLE_FIELDS.items():
        ours = None if row.get(name) is None else form(row[name])
        theirs = None if meta[name] is None else form(meta[name])
        if ours != theirs:
            out.append(f"{name}: images.parquet has {ours!r}, the sample {theirs!r}")
    return out


def check_counts(folder: OutputFolder, images, shards, found, listed) -> list[Problem]:
    out = []
    identity_of = {r["image_id"]: r["identity_id"] for r in images if r["status"] == schema.KEPT}
    keys_in: dict[str, set[str]] = defaultdict(set)
    for key, places in found.items():
        for shard in places:
            keys_in[shard].add(key)
    for row in {s["path"]: s for s in shards}.values():
        keys = keys_in.get(row["path"], set())
        idents = {identity_of[k] for k in keys if k in identity_of}
        if len(keys) != row["samples"]:
            out.append(Problem("manifest_mismatch", row["path"], detail=f"shards.parquet says {row['samples']} samples, the tar has {len(keys)}"))
        if len(idents) != row["identities"] and all(k in identity_of for k in keys):
            out.append(Problem("manifest_mismatch", row["path"], detail=f"shards.parquet says {row['identities']} identities, the tar has {len(idents)}"))
    if folder.has(IDENTITIES):
        listed_counts = {r["identity_id"]: r["images"] for r in folder.read(IDENTITIES, columns=["identity_id", "images"]).to_pylist()}
        actual = Counter(i for i in identity_of.values() if i is not None)
        for ident in sorted(set(listed_counts) | set(actual)):
            if listed_counts.get(ident, 0) != actual.get(ident, 0):
                out.append(Problem("manifest_mismatch", None, None, None,
                                   f"identity {ident}: identities.parquet says {listed_counts.get(ident, 0)} images, images.parquet has {actual.get(ident, 0)} kept"))  # fmt: skip
    return out

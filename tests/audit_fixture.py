"""A small but real build output folder for the auditor tools' tests.

Real photos (the shared face fixtures), every file of the output contract: ``images.parquet``
conforming to ``datakit.schema``, the per-stage work folder (``_work/<stage>/part-*.parquet``
with the bulk image bytes and face crops, stats, ``_SUCCESS``), and the WebDataset tars,
``shards.parquet``, ``shard_members.parquet`` and ``identities.parquet`` written by the real
shard stage's steps (``datakit.stages.shard``, run in process without Ray), plus ``build.json``.

The face values (boxes, scores, embeddings, ages) are made up but consistent, so the fixture needs
no face model; the decisions cover every kind an auditor meets: kept images of 8 identities (one
spanning both sources, one with a hostile HTML label, one with exactly 5 images), drops at
download (HTTP 404, undecodable bytes), detect (no face), filter (small face, blur), dedup (exact
and near duplicates), cluster (an outlier, an identity that is too small), unknown ages and
genders.

``build_output(dest)`` writes it; the pytest fixtures ``audit_template`` (built once per session,
read-only) and ``audit_output`` (a fresh copy per test, free to damage) give it to tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from datakit import schema
from datakit.engine import manifests
from datakit.store import ITEMS, WorkDir, atomic_write_json, atomic_write_table

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared" / "fixtures" / "faces"

FOLDER, URLS = "vgg_folder", "imdb_urls"
STAGES = ["download", "detect", "filter", "embed", "attributes", "dedup", "cluster", "caption", "shard"]
PARTITION_SIZE = 32
MAX_SAMPLES_PER_SHARD = 24
HOSTILE_LABEL = "</script><script>window.pwned=1</script>John Salley"
GENDER = {
    "Colin_Powell": "male", "Kofi_Annan": "male", "Laura_Bush": "female", "Tony_Blair": "male",
    "Hugo_Chavez": None, "Nicole_Kidman": "female", "Tiger_Woods": "male", "John_Salley": "male",
    "George_W_Bush": "male",
}  # fmt: skip
BASE_AGE = {"Colin_Powell": 66, "Kofi_Annan": 63, "Laura_Bush": 57, "Tony_Blair": 50, "Hugo_Chavez": 48,
            "Nicole_Kidman": 36, "Tiger_Woods": 28, "John_Salley": 39, "George_W_Bush": 56}  # fmt: skip


@dataclass
class Item:
    source: str
    locator: str
    label: str | None
    person: str | None  # the dev folder the photo is of (drives made-up ages and embeddings)
    file: Path | None  # photo bytes; None: the download failed
    drop: tuple[str, str, str] | None = None  # (stage, reason, detail)
    values: dict = field(default_factory=dict)  # column overrides
    identity: str | None = None  # the identity it is clustered into (kept or not)

    @property
    def image_id(self) -> str:
        return schema.image_id(self.source, self.locator)


@dataclass
class Built:
    output: Path
    items: list[Item]

    def by_label(self, label: str) -> list[Item]:
        return [i for i in self.items if i.label == label]

    def find(self, locator: str) -> Item:
        return next(i for i in self.items if i.locator == locator)


def identity_id(name: str) -> str:
    return hashlib.sha1(f"name\0{name}".encode()).hexdigest()[:16]


def dev(person: str, n: int) -> Path:
    return FACES / "dev" / person / f"{person}_{n:04d}.jpg"


def url(person: str, n: int) -> str:
    return f"http://imdb.example/{person.lower()}/{n:02d}.jpg"


def plan_items() -> list[Item]:
    items: list[Item] = []

    def folder(person: str, numbers, label: str | None = None, identity: str | None = None, **kw):
        for n in numbers:
            items.append(Item(FOLDER, f"{person}/{person}_{n:04d}.jpg", label or person, person, dev(person, n),
                              identity=identity if identity is not None else identity_id(person), **kw))  # fmt: skip

    def urls(person: str, numbers, label: str, **kw):
        for n in numbers:
            items.append(Item(URLS, url(person, n), label, person, dev(person, n), identity=identity_id(person), **kw))

    folder("Colin_Powell", range(1, 9))
    folder("Kofi_Annan", range(1, 9))
    folder("Laura_Bush", range(1, 8))
    laura = schema.image_id(FOLDER, "Laura_Bush/Laura_Bush_0001.jpg")
    folder("Laura_Bush", [8], drop=("dedup", "duplicate_near", f"near-duplicate of {laura} (phash distance 2, embedding distance 0.08)"),
           values={"duplicate_of": laura})  # fmt: skip
    folder("Tony_Blair", range(1, 7))
    folder("Tony_Blair", [7], drop=("filter", "face_blurry", "face sharpness 3.1 is under the minimum 5"), values={"sharpness": 3.1})
    folder("George_W_Bush", [1], label="Tony_Blair", identity="",
           drop=("cluster", "identity_outlier", "face does not match the dominant faces of 'Tony_Blair' (threshold 0.5)"),
           values={"identity_distance": 0.71})  # fmt: skip
    folder("George_W_Bush", range(2, 5),
           drop=("cluster", "identity_too_small", "identity has 3 images; cluster.min_images is 5"))  # fmt: skip
    folder("Hugo_Chavez", range(1, 6))
    folder("Hugo_Chavez", [6], drop=("filter", "face_too_small_area", "the face box covers 7.0% of the image; the minimum is 10.0%"),
           values={"face_area_fraction": 0.07})  # fmt: skip
    urls("Nicole_Kidman", range(1, 9), "Nicole Kidman")
    items.append(Item(URLS, url("Nicole_Kidman", 9), "Nicole Kidman", "Nicole_Kidman", None,
                      drop=("download", "http_error", "HTTP 404 Not Found"), values={"http_status": 404}))  # fmt: skip
    items.append(Item(URLS, "http://imdb.example/nicole_kidman/notes.jpg", "Nicole Kidman", None,
                      FACES / "negatives" / "non_photo" / "not_an_image.jpg",
                      drop=("download", "undecodable", "cannot identify image file")))  # fmt: skip
    urls("Tiger_Woods", range(1, 8), "Tiger Woods")
    items.append(Item(URLS, "http://imdb.example/tiger_woods/crowd.jpg", "Tiger Woods", None,
                      FACES / "negatives" / "tiny_face" / "1256138.jpg",
                      drop=("filter", "face_too_small_area", "the face box covers 0.4% of the image; the minimum is 10.0%"),
                      values={"face_area_fraction": 0.004}))  # fmt: skip
    items.append(Item(URLS, "http://imdb.example/tiger_woods/cat.jpg", "Tiger Woods", None,
                      FACES / "negatives" / "no_face" / "cat.jpg", drop=("detect", "no_face", "no face found")))  # fmt: skip
    urls("Colin_Powell", [9, 10], "Colin Powell")
    kofi = schema.image_id(FOLDER, "Kofi_Annan/Kofi_Annan_0001.jpg")
    items.append(Item(URLS, "http://imdb.example/kofi_annan/01.jpg", "Kofi Annan", "Kofi_Annan", dev("Kofi_Annan", 1),
                      identity=identity_id("Kofi_Annan"),
                      drop=("dedup", "duplicate_exact", f"same bytes as {kofi} (source {FOLDER})"), values={"duplicate_of": kofi}))  # fmt: skip
    urls("John_Salley", range(1, 6), HOSTILE_LABEL)
    return items


# ---------------------------------------------------------------- per-item values


def stage_index(stage: str) -> int:
    return STAGES.index(stage)


def alive_after(item: Item, stage: str) -> bool:
    return item.drop is None or stage_index(item.drop[0]) > stage_index(stage)


def alive_before(item: Item, stage: str) -> bool:
    return item.drop is None or stage_index(item.drop[0]) >= stage_index(stage)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue()


def item_values(item: Item, n: int) -> dict:
    """Every column's value for one item (decisions aside), as the stages would have set them."""
    rng = np.random.default_rng(int(item.image_id, 16) % 2**32)
    v: dict = {"http_status": 200 if item.source == URLS else None, "attempts": 1}
    data = item.file.read_bytes() if item.file is not None else None
    if data is not None:
        v.update(final_url=item.locator if item.source == URLS else None, content_type="image/jpeg" if item.source == URLS else None,
                 sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), image_bytes=data)  # fmt: skip
    image = None
    if data is not None and item.person is not None or (item.file and item.file.parent.name in ("tiny_face", "no_face")):
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        v.update(format="JPEG", width=image.width, height=image.height, mode="RGB")
    if image is not None and (item.drop is None or item.drop[1] != "no_face"):
        w, h = image.size
        area = float(item.values.get("face_area_fraction", round(0.16 + 0.08 * rng.random(), 3)))
        side = (area * w * h) ** 0.5
        cx, cy = w / 2 + rng.normal(0, 2), h / 2 + rng.normal(0, 2)
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        v.update(face_backend="dlib", face_count=1, face_box=[round(b, 2) for b in box], face_score=round(1.5 + rng.random(), 3),
                 face_area_fraction=area, sharpness=round(20 + 60 * rng.random(), 2), other_faces="[]")  # fmt: skip
        v["landmarks5"] = [round(float(x), 2) for x in (
            cx - side * 0.2, cy - side * 0.1, cx + side * 0.2, cy - side * 0.1, cx, cy + side * 0.05,
            cx - side * 0.15, cy + side * 0.25, cx + side * 0.15, cy + side * 0.25)]  # fmt: skip
        crop = image.crop(tuple(int(round(b)) for b in box)).resize((112, 112), Image.BICUBIC)
        v["face_crop"] = jpeg(crop, 95)
        centre = np.random.default_rng(sum(map(ord, item.person or "?"))).normal(size=128)
        emb = centre + rng.normal(0, 0.35, size=128)
        v.update(embedding=(emb / np.linalg.norm(emb)).astype(np.float32).tolist(), embedding_model="dlib_face_recognition_resnet_model_v1")
        v.update(phash=f"{int(rng.integers(0, 2**63)):016x}", phash_mirror=f"{int(rng.integers(0, 2**63)):016x}")
        age = None if n % 6 == 5 else round(BASE_AGE[item.person] + float(rng.normal(0, 3)), 1) if item.person else None
        gender = GENDER.get(item.person or "", None)
        v.update(age=age, age_source="model:genderage" if age is not None else None, gender=gender,
                 gender_source=("names:gender-guesser" if gender else None))  # fmt: skip
        v["identity_distance"] = round(0.2 + 0.2 * rng.random(), 3)
    v.update(item.values)
    return v


def caption_of(v: dict) -> str:
    who = {"female": "a woman", "male": "a man"}.get(v.get("gender"), "a person")
    age = f" in their {int(v['age']) // 10 * 10}s" if v.get("age") is not None else ""
    framing = "a close-up portrait photo" if (v.get("face_area_fraction") or 0) >= 0.2 else "a photo"
    return f"{framing} of {who}{age}"


# ---------------------------------------------------------------- stages


STAGE_COLUMNS = {
    "download": ["http_status", "attempts", "final_url", "content_type", "sha256", "bytes", "format", "width", "height", "mode", "image_bytes"],
    "detect": ["face_backend", "face_count", "face_box", "face_score", "face_area_fraction", "landmarks5", "landmarks68", "sharpness", "other_faces"],
    "filter": [],
    "embed": ["embedding", "embedding_model", "face_crop"],
    "attributes": ["age", "age_source", "gender", "gender_source"],
    "dedup": ["duplicate_of", "phash", "phash_mirror"],
    "cluster": ["identity_id", "identity_distance", "review_flag"],
    "caption": ["caption", "caption_source", "caption_detail"],
    "shard": ["shard", "key"],
}  # fmt: skip
BULK_TYPES = {"image_bytes": pa.binary(), "face_crop": pa.binary()}


def column_type(name: str) -> pa.DataType:
    return BULK_TYPES.get(name) or schema.IMAGE_COLUMNS[name][0]


def stage_table(stage: str, items: list[Item], values: list[dict]) -> tuple[pa.Table, dict]:
    rows = []
    for item, v in zip(items, values):
        row = {"image_id": item.image_id}
        dropped = not alive_after(item, stage)
        if dropped:
            st, reason, detail = item.drop
            row.update(status=schema.DROPPED, drop_stage=st, reason=reason, detail=detail)
        else:
            row.update(status=schema.KEPT, drop_stage=None, reason=None, detail=None)
        worked_on = alive_before(item, stage)
        for col in STAGE_COLUMNS[stage]:
            # a stage sets its columns on the rows it saw; the dropping stage records its evidence too
            row[col] = v.get(col) if worked_on else None
        if stage == "detect" and worked_on and item.drop and item.drop[1] == "no_face":
            row.update(face_backend="dlib", face_count=0)
        rows.append(row)
    types = {"image_id": pa.string(), "status": pa.string(), "drop_stage": pa.string(), "reason": pa.string(), "detail": pa.string()}
    types.update({c: column_type(c) for c in STAGE_COLUMNS[stage]})
    table = pa.table({c: pa.array([r[c] for r in rows], type=t) for c, t in types.items()})
    before = [alive_before(i, stage) for i in items]
    after = [alive_after(i, stage) for i in items]
    dropped = {}
    for i, b, a in zip(items, before, after):
        if b and not a:
            dropped[i.drop[1]] = dropped.get(i.drop[1], 0) + 1
    stats = {"stage": stage, "items_in": sum(before), "kept": sum(after), "dropped": dict(sorted(dropped.items())), "seconds": 0.01}
    return table, stats


# ---------------------------------------------------------------- shards


def run_shard_stage(dest: Path, work: WorkDir) -> pa.Table:
    """The shard stage's steps themselves (datakit/stages/shard, no Ray) over the work folder up to caption."""
    from datakit.engine.local_executor import run_stages
    from datakit.stages.shard.encode import ShardEncodeStage
    from datakit.stages.shard.plan import Settings, ShardStage

    settings, context = Settings(max_samples=MAX_SAMPLES_PER_SHARD, min_shards=3), {"output_dir": str(dest)}
    steps = run_stages(work, [ShardEncodeStage(settings, context), ShardStage(settings, context)], STAGES[:-1])
    return work.read_all(steps, columns=["image_id", "status", "drop_stage", "reason", "detail", "shard", "key"])


# ---------------------------------------------------------------- the folder


def recipe_dict(output: Path) -> dict:
    return {
        "name": "audit-fixture",
        "description": "a small build for the auditor tools' tests",
        "output": str(output),
        "sources": [
            {"name": FOLDER, "kind": "folder", "root": str(FACES / "dev"), "extensions": None,
             "license": "VGGFace2-HQ layout, LFW photos: research use only (UMass Amherst)", "intended_use": "research only",
             "homepage": "http://vis-www.cs.umass.edu/lfw/"},
            {"name": URLS, "kind": "urls", "path": str(output.parent / "urls.csv"), "format": "csv", "url_column": "url",
             "name_column": "name", "license": "IMDb-Face URL list: non-commercial research", "intended_use": "research only",
             "homepage": None},
        ],  # fmt: skip
        "faces": None,
        "stages": {
            "download": {"timeout_s": 10.0},
            "detect": {},
            "filter": {"min_area_fraction": 0.1, "min_face_px": 40.0, "min_sharpness": 5.0, "dominance_ratio": 2.0},
            "embed": {},
            "attributes": {},
            "dedup": {},
            "cluster": {"min_images": 5},
            "caption": {"mode": "template"},
            "shard": {"max_samples": MAX_SAMPLES_PER_SHARD},
        },
        "ray": {"partition_size": PARTITION_SIZE},
    }


def build_output(dest: Path) -> Built:
    """Write the fixture output folder at ``dest`` (which must not exist)."""
    if not (FACES / "dev").is_dir():
        pytest.skip(f"face fixtures not found at {FACES} (the shared/ folder must sit beside the repo)")
    dest.mkdir(parents=True)
    items = plan_items()
    values = [item_values(item, n) for n, item in enumerate(items)]
    for item, v in zip(items, values):
        if alive_before(item, "cluster"):
            v["identity_id"] = item.identity or None
        if item.drop is None:
            v["caption"], v["caption_source"] = caption_of(v), "template"
    work = WorkDir(dest)
    recipe = recipe_dict(dest)
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    atomic_write_json(work.root / "recipe.json", {"hash": recipe_hash, "file": "audit-fixture.yaml", "recipe": recipe})
    parts = (len(items) + PARTITION_SIZE - 1) // PARTITION_SIZE
    stats_by_stage: dict[str, list[dict]] = {s: [] for s in STAGES}
    for part in range(parts):
        lo, hi = part * PARTITION_SIZE, (part + 1) * PARTITION_SIZE
        pitems, pvalues = items[lo:hi], values[lo:hi]
        base = pa.table({
            "image_id": [i.image_id for i in pitems], "source": [i.source for i in pitems],
            "source_kind": ["folder" if i.source == FOLDER else "urls" for i in pitems],
            "locator": [i.locator for i in pitems], "label": [i.label for i in pitems],
            "extra": [None if i.source == FOLDER else json.dumps({"note": ""}) for i in pitems],
            "fetch_uri": [str(FACES / "dev" / i.locator) if i.source == FOLDER else i.locator for i in pitems],
            "status": [schema.KEPT] * len(pitems), "drop_stage": pa.nulls(len(pitems), pa.string()),
            "reason": pa.nulls(len(pitems), pa.string()), "detail": pa.nulls(len(pitems), pa.string()),
        })  # fmt: skip
        atomic_write_table(work.part_path(ITEMS, part), base)
        for stage in STAGES[:-1]:
            table, stats = stage_table(stage, pitems, pvalues)
            work.write_part(stage, part, table, {**stats, "part": part})
            stats_by_stage[stage].append(stats)
    by_source: dict[str, int] = {}
    for i in items:
        by_source[i.source] = by_source.get(i.source, 0) + 1
    work.mark_done(ITEMS, {"partitions": parts, "items": len(items), "by_source": by_source})
    for stage in STAGES[:-1]:
        work.mark_done(stage, {"partitions": parts})
    run_shard_stage(dest, work)  # its two steps write their own partitions and stats
    stats_by_stage["shard"] = work.read_stats("shard")
    table = schema.conform(work.read_all([*STAGES[:-1], "shard_encode", "shard"], columns=[c for c in schema.IMAGE_COLUMNS]))
    dropped_by_shard = [r for r in table.to_pylist() if r["drop_stage"] == "shard"]
    if dropped_by_shard:
        raise RuntimeError(f"the shard stage dropped fixture rows: {dropped_by_shard[0]['detail']}")
    atomic_write_table(dest / "images.parquet", table)
    manifests.write_shard_manifests(work, table)
    write_build_json(dest, recipe, recipe_hash, table, stats_by_stage, by_source)
    return Built(dest, items)


def write_build_json(dest: Path, recipe: dict, recipe_hash: str, table: pa.Table, stats_by_stage, by_source) -> None:
    status = table.column("status").to_pylist()
    reasons: dict[str, int] = {}
    for s, r in zip(status, table.column("reason").to_pylist()):
        if s != schema.KEPT:
            reasons[r] = reasons.get(r, 0) + 1
    stages = {}
    for name, stats in stats_by_stage.items():
        dropped: dict[str, int] = {}
        for s in stats:
            for k, n in s["dropped"].items():
                dropped[k] = dropped.get(k, 0) + n
        stages[name] = {"items_in": sum(s["items_in"] for s in stats), "kept": sum(s["kept"] for s in stats),
                        "dropped": dict(sorted(dropped.items())), "seconds": round(sum(s["seconds"] for s in stats), 3)}  # fmt: skip
    build = {
        "datakit_version": "0.1.0",
        "schema_version": schema.SCHEMA_VERSION,
        "recipe_file": "audit-fixture.yaml",
        "recipe_hash": recipe_hash,
        "recipe": recipe,
        "packages": {"pyarrow": pa.__version__},
        "models": {},
        "counts": {"items": len(status), "kept": status.count(schema.KEPT), "dropped": len(status) - status.count(schema.KEPT),
                   "dropped_by_reason": dict(sorted(reasons.items())), "items_by_source": by_source},  # fmt: skip
        "stages": stages,
        "runs": [{"started": "2025-01-01T00:00:00Z", "finished": "2025-01-01T00:01:00Z", "wall_seconds": 60.0}],
    }
    atomic_write_json(dest / "build.json", build)


# ---------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def audit_template(tmp_path_factory) -> Built:
    """The fixture output, built once per session. Do not modify it: use ``audit_output``."""
    return build_output(tmp_path_factory.mktemp("audit") / "out")


@pytest.fixture
def audit_output(audit_template: Built, tmp_path) -> Built:
    """A private copy of the fixture output that a test may change or damage."""
    dest = tmp_path / "out"
    shutil.copytree(audit_template.output, dest)
    return Built(dest, audit_template.items)


def read_images(output: Path) -> pa.Table:
    return pq.read_table(output / "images.parquet")

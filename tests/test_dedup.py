"""Dedup stage: exact duplicates by sha256, near duplicates by phash confirmed by real dlib
embeddings, the keep rule, the banded candidate search, and the Ray path."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from datakit import schema
from portrait.decode import load_rgb
from datakit.engine.local_executor import run_stages
from datakit.stages.dedup import DedupSettings, DedupStage, near_hash_pairs
from datakit.stages.phash import PhashStage, phash_pair
from datakit.store import ITEMS, WorkDir, remove_tree

DLIB_MODEL = "dlib_face_recognition_resnet_model_v1"

# ---------------------------------------------------------------- helpers


class DlibEmbedder:
    """dlib's 128-d face embedding of the largest face, straight from dlib and the model files of
    face_recognition_models (located without importing it: its __init__ needs pkg_resources)."""

    def __init__(self):
        import dlib

        models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
        self.detector = dlib.get_frontal_face_detector()
        self.shape5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(str(models / f"{DLIB_MODEL}.dat"))

    def __call__(self, data: bytes) -> list[float]:
        rgb = np.asarray(load_rgb(data))
        faces = list(self.detector(rgb, 1))
        assert faces, "no face found in a fixture photo"
        face = max(faces, key=lambda r: r.area())
        vec = np.asarray(self.encoder.compute_face_descriptor(rgb, self.shape5(rgb, face)), dtype=np.float32)
        return (vec / np.linalg.norm(vec)).tolist()


@pytest.fixture(scope="module")
def embedder():
    return DlibEmbedder()


def flipped_jpeg(data: bytes, quality: int = 70) -> bytes:
    out = io.BytesIO()
    load_rgb(data).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "JPEG", quality=quality)
    return out.getvalue()


def resized_jpeg(data: bytes, scale: float) -> bytes:
    img = load_rgb(data)
    out = io.BytesIO()
    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS).save(out, "JPEG", quality=90)
    return out.getvalue()


def item(source: str, locator: str, data: bytes, status: str = schema.KEPT, reason: str | None = None) -> dict:
    img = load_rgb(data)
    return {
        "image_id": schema.image_id(source, locator),
        "source": source,
        "locator": locator,
        "status": status,
        "drop_stage": None if status == schema.KEPT else "detect",
        "reason": reason,
        "detail": None,
        "image_bytes": data,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": img.width,
        "height": img.height,
    }


def write_work(tmp_path: Path, parts: list[list[dict]], embedder=None) -> tuple[WorkDir, list[str]]:
    """A work folder as the runner leaves it: items partitions, plus an 'embed' stage's columns
    when an embedder is given (then upstream is ['embed'], else []). An item's "embed_as" bytes,
    when present, are embedded in place of its own."""
    work = WorkDir(tmp_path / "out")
    for part, items in enumerate(parts):
        embed_as = [r.pop("embed_as", r["image_bytes"]) for r in items]
        work.write_part(ITEMS, part, pa.Table.from_pylist(items), {"part": part})
        if embedder is not None:
            embeddings = [embedder(b) if r["status"] == schema.KEPT else None for r, b in zip(items, embed_as)]
            update = pa.table(
                {
                    "image_id": [r["image_id"] for r in items],
                    "embedding": pa.array(embeddings, type=schema.LIST_F32),
                    "embedding_model": [DLIB_MODEL if e is not None else None for e in embeddings],
                }
            )
            work.write_part("embed", part, update, {"part": part})
    work.mark_done(ITEMS, {"partitions": len(parts)})
    if embedder is not None:
        work.mark_done("embed", {"partitions": len(parts)})
    return work, (["embed"] if embedder is not None else [])


OUT_COLUMNS = ["image_id", "status", "drop_stage", "reason", "detail", "duplicate_of", "phash", "phash_mirror"]


def dedup_table(work, upstream, context=None, **settings) -> pa.Table:
    """The phash step and the dedup step in this process (again from scratch: earlier runs' files go)."""
    for step in ("phash", "dedup"):
        remove_tree(work.stage_dir(step))
    s, context = DedupSettings(**settings), context or {}
    steps = run_stages(work, [PhashStage(s, context), DedupStage(s, context)], upstream)
    return work.read_all(steps, columns=OUT_COLUMNS)


def run_dedup(work, upstream, context=None, **settings) -> dict[str, dict]:
    out = dedup_table(work, upstream, context, **settings)
    ids = [r["image_id"] for r in work.read_all(upstream, columns=["image_id"]).to_pylist()]
    assert out.column("image_id").to_pylist() == ids  # every row, in partition order
    assert out.column_names == OUT_COLUMNS
    return {r["image_id"]: r for r in out.to_pylist()}


def dev_photo(faces_dir: Path, identity: str, n: int) -> bytes:
    return next((faces_dir / "dev" / identity).glob(f"{identity}_{n:04d}.*")).read_bytes()


# ---------------------------------------------------------------- near duplicates on real photos


def test_flipped_recompressed_copy_is_a_near_duplicate_and_other_photos_are_not(tmp_path, faces_dir, embedder):
    person = "Jerry_Seinfeld"
    photos = [dev_photo(faces_dir, person, n) for n in range(1, 7)]
    original = photos[1]
    copy = flipped_jpeg(original)
    other = dev_photo(faces_dir, "Tony_Blair", 1)
    web = [item("web", "jerry-copy.jpg", copy), item("web", "tony.jpg", other)]
    folder = [item("folder", f"{person}/{i}.jpg", p) for i, p in enumerate(photos)]
    work, upstream = write_work(tmp_path, [folder, web], embedder)

    rows = run_dedup(work, upstream, context={"source_order": ["folder", "web"]})
    kept_id, copy_id = folder[1]["image_id"], web[0]["image_id"]
    assert rows[copy_id]["status"] == schema.DROPPED
    assert rows[copy_id]["reason"] == "duplicate_near" and rows[copy_id]["drop_stage"] == "dedup"
    assert rows[copy_id]["duplicate_of"] == kept_id  # same pixel count: the earlier source stays
    assert kept_id in rows[copy_id]["detail"]
    # the five other photos of the same person, and another person, are not duplicates
    dropped = [i for i, r in rows.items() if r["status"] != schema.KEPT]
    assert dropped == [copy_id]
    assert all(r["phash"] and len(r["phash"]) == 16 for r in rows.values())


def test_same_person_photos_are_not_flagged(tmp_path, faces_dir, embedder):
    """Ten LFW frames of one person (same framing, same person: the closest non-duplicates)."""
    person = "George_W_Bush"
    items = [item("lfw", f"{person}/{n}.jpg", dev_photo(faces_dir, person, n)) for n in range(1, 11)]
    work, upstream = write_work(tmp_path, [items], embedder)
    rows = run_dedup(work, upstream)
    assert all(r["status"] == schema.KEPT for r in rows.values())


def test_a_hash_match_needs_the_embedding_to_agree(tmp_path, faces_dir, embedder):
    """Two images whose hashes match but whose faces are different people (a collision, made
    here by embedding another person's photo for the copy) are not duplicates."""
    original = dev_photo(faces_dir, "Jerry_Seinfeld", 2)
    copy = item("b", "flip.jpg", flipped_jpeg(original))
    copy["embed_as"] = dev_photo(faces_dir, "Tony_Blair", 1)
    twin = item("b", "flip2.jpg", flipped_jpeg(original, quality=50))
    work, upstream = write_work(tmp_path, [[item("a", "x.jpg", original), copy, twin]], embedder)
    rows = run_dedup(work, upstream, context={"source_order": ["a", "b"]})
    assert rows[copy["image_id"]]["status"] == schema.KEPT
    assert rows[twin["image_id"]]["reason"] == "duplicate_near"  # the same pair with its own face goes
    assert "embedding distance" in rows[twin["image_id"]]["detail"]


def test_the_larger_copy_is_kept_even_from_a_later_source(tmp_path, faces_dir, embedder):
    original = dev_photo(faces_dir, "Mindy_Kaling", 7)  # a 360x240 web photo
    small = resized_jpeg(original, 0.75)
    a = item("a", "small.jpg", small)
    b = item("b", "original.jpg", original)
    work, upstream = write_work(tmp_path, [[a], [b]], embedder)
    rows = run_dedup(work, upstream, context={"source_order": ["a", "b"]})
    assert rows[b["image_id"]]["status"] == schema.KEPT
    assert rows[a["image_id"]]["reason"] == "duplicate_near"
    assert rows[a["image_id"]]["duplicate_of"] == b["image_id"]


def test_without_embeddings_only_exact_duplicates_go(tmp_path, faces_dir):
    original = dev_photo(faces_dir, "Jerry_Seinfeld", 2)
    items = [item("a", "x.jpg", original), item("a", "flip.jpg", flipped_jpeg(original)), item("b", "same.jpg", original)]
    work, upstream = write_work(tmp_path, [items])  # no embed stage ran
    rows = run_dedup(work, upstream, context={"source_order": ["a", "b"]})
    assert rows[items[1]["image_id"]]["status"] == schema.KEPT  # a near copy, but nothing to confirm it with
    assert rows[items[2]["image_id"]]["reason"] == "duplicate_exact"
    # the hashes are there for later: the flipped copy's hash is near the original's mirror hash
    h = int(rows[items[0]["image_id"]]["phash_mirror"], 16)
    f = int(rows[items[1]["image_id"]]["phash"], 16)
    assert bin(h ^ f).count("1") <= 4


# ---------------------------------------------------------------- exact duplicates and the keep rule


def test_exact_duplicates_within_and_across_sources(tmp_path, demo_dir):
    photos = sorted((demo_dir / "folder").glob("*/*.jpg"))
    a, b, c = (p.read_bytes() for p in photos[:3])
    first = [item("folder", "a1.jpg", a), item("folder", "a2.jpg", a), item("folder", "b.jpg", b)]
    second = [
        item("web", "a3.jpg", a),
        item("web", "b2.jpg", b),
        item("web", "c.jpg", c),
        item("web", "a-dropped.jpg", a, status=schema.DROPPED, reason="no_face"),
    ]
    # recipe order puts "web" first: its copies win ties on pixel count
    work, upstream = write_work(tmp_path, [first, second])
    rows = run_dedup(work, upstream, context={"source_order": ["web", "folder"]})
    ids = {r["locator"]: r["image_id"] for r in first + second}

    assert rows[ids["a3.jpg"]]["status"] == schema.KEPT
    for loc in ("a1.jpg", "a2.jpg"):
        assert rows[ids[loc]]["reason"] == "duplicate_exact"
        assert rows[ids[loc]]["duplicate_of"] == ids["a3.jpg"]
        assert ids["a3.jpg"] in rows[ids[loc]]["detail"] and "web" in rows[ids[loc]]["detail"]
    assert rows[ids["b.jpg"]]["duplicate_of"] == ids["b2.jpg"]
    assert rows[ids["c.jpg"]]["status"] == schema.KEPT
    # an earlier drop is left as it was, and is not anyone's twin
    assert rows[ids["a-dropped.jpg"]]["reason"] == "no_face" and rows[ids["a-dropped.jpg"]]["duplicate_of"] is None
    assert rows[ids["a-dropped.jpg"]]["phash"] is None


def test_ties_go_to_the_smaller_image_id_and_sources_default_to_first_seen(tmp_path, demo_dir):
    data = next((demo_dir / "folder").glob("*/*.jpg")).read_bytes()
    items = [item("s", f"copy{i}.jpg", data) for i in range(4)] + [item("t", "copy.jpg", data)]
    work, upstream = write_work(tmp_path, [items[:2], items[2:]])
    rows = run_dedup(work, upstream)  # no source_order: "s" appears first
    in_s = sorted(r["image_id"] for r in items if r["source"] == "s")
    kept = [i for i, r in rows.items() if r["status"] == schema.KEPT]
    assert kept == [in_s[0]]
    assert {r["duplicate_of"] for i, r in rows.items() if i != in_s[0]} == {in_s[0]}


def test_same_input_same_output(tmp_path, faces_dir, embedder):
    original = dev_photo(faces_dir, "Jerry_Seinfeld", 2)
    items = [item("a", "x.jpg", original), item("b", "flip.jpg", flipped_jpeg(original)), item("b", "x.jpg", original)]
    work, upstream = write_work(tmp_path, [items], embedder)
    first = dedup_table(work, upstream)
    second = dedup_table(work, upstream)
    assert first.equals(second)
    assert first.column("status").to_pylist().count(schema.KEPT) == 1


def test_unknown_embedding_model_is_a_clear_error(tmp_path, faces_dir, embedder):
    original = dev_photo(faces_dir, "Jerry_Seinfeld", 2)
    items = [item("a", "x.jpg", original), item("b", "flip.jpg", flipped_jpeg(original))]
    work, upstream = write_work(tmp_path, [items], embedder)
    with pytest.raises(ValueError, match=r"dlib_face_recognition_resnet_model_v1.*dedup\.max_embedding_distance"):
        dedup_table(work, upstream, max_embedding_distance={"arcface": 0.5})


# ---------------------------------------------------------------- candidate search


def brute_force_pairs(h, m, threshold):
    out = []
    for i, j in itertools.combinations(range(len(h)), 2):
        d = min(bin(int(h[i]) ^ int(h[j])).count("1"), bin(int(h[i]) ^ int(m[j])).count("1"), bin(int(m[i]) ^ int(h[j])).count("1"))
        if d <= threshold:
            out.append((i, j, d))
    return out


@pytest.mark.parametrize("threshold", [0, 3, 6])
def test_banded_search_finds_exactly_what_all_pairs_finds(threshold):
    rng = np.random.default_rng(threshold)
    n = 600
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    m = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    # plant near twins: copies of an image's hash or mirror hash with a few bits flipped
    for k in range(60):
        src, dst = rng.integers(0, n, 2)
        base = h[src] if k % 2 else m[src]
        bits = rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False)
        flip = np.uint64(sum(1 << int(b) for b in bits))
        h[dst] = base ^ flip
    found = [tuple(int(v) for v in row) for row in near_hash_pairs(h, m, threshold, block=64)]
    expected = brute_force_pairs(h, m, threshold)
    assert found == sorted(expected)
    assert len(expected) > 10  # the planted twins are there to be found


def test_phash_pair_mirror_matches_a_flipped_image(demo_dir):
    data = next((demo_dir / "folder").glob("*/*.jpg")).read_bytes()
    h, m = phash_pair(data)
    fh, fm = phash_pair(flipped_jpeg(data, quality=60))
    assert bin(int(h, 16) ^ int(fm, 16)).count("1") <= 4
    assert bin(int(m, 16) ^ int(fh, 16)).count("1") <= 4
    assert bin(int(h, 16) ^ int(fh, 16)).count("1") > 8  # without the mirror it would not match


# ---------------------------------------------------------------- on Ray


def test_phash_step_on_the_ray_executor_gives_the_same_result(tmp_path, faces_dir, embedder, ray_local):
    """The phash step as a Ray actor pool (the Ray executor), dedup in process: same hashes as
    phash_pair, same decisions as an all-local run."""
    from datakit.engine.plan import Step
    from datakit.engine.ray_executor import RayExecutor

    original = dev_photo(faces_dir, "Jerry_Seinfeld", 2)
    parts = [
        [item("a", "x.jpg", original), item("a", "y.jpg", dev_photo(faces_dir, "Jerry_Seinfeld", 3))],
        [item("b", "flip.jpg", flipped_jpeg(original)), item("b", "x.jpg", original)],
    ]
    data = [r["image_bytes"] for part in parts for r in part]
    work, upstream = write_work(tmp_path, parts, embedder)
    local = dedup_table(work, upstream)
    remove_tree(work.stage_dir("phash"))
    remove_tree(work.stage_dir("dedup"))
    assert ray_local.is_initialized()
    RayExecutor().run_partitions(work, [Step("phash", PhashStage, DedupSettings(num_cpus=0.25))], upstream, {}, [0, 1])
    run_stages(work, [DedupStage(DedupSettings(), {})], [*upstream, "phash"])
    on_ray = work.read_all([*upstream, "phash", "dedup"], columns=OUT_COLUMNS)
    assert on_ray.column("phash").to_pylist() == [phash_pair(b)[0] for b in data]
    assert on_ray.column("phash_mirror").to_pylist() == [phash_pair(b)[1] for b in data]
    assert on_ray.column("reason").to_pylist() == [None, None, "duplicate_near", "duplicate_exact"]
    assert on_ray.equals(local)

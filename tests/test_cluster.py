"""Identity clustering: graph pieces, the stage's decisions, and quality on real dlib embeddings.

The quality tests embed the dev photos of ../shared/fixtures/faces with dlib (tests/dlib_embeddings.py,
cached under .pytest_cache) and skip with a message when that folder is absent.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from datakit import graph, schema
from datakit.engine.local_executor import run_stages
from datakit.stages import cluster
from datakit.sources import ITEM_SCHEMA
from datakit.store import WorkDir, atomic_write_table, remove_tree
from devtools.synthetic_faces import synthetic_corpus

from dlib_embeddings import DEV_DIR, dev_embeddings, negative_embeddings, variant_embeddings

DLIB = "dlib_face_recognition_resnet_model_v1"
TAU = cluster.DEFAULT_THRESHOLDS["dlib"]


@pytest.fixture(scope="session")
def dev(request):
    if not DEV_DIR.is_dir():
        pytest.skip(f"face fixtures not found at {DEV_DIR} (expected ../shared/fixtures/faces beside the repo)")
    cache = request.config.cache.mkdir("dlib_embeddings")
    return dev_embeddings(cache), negative_embeddings(cache)


# ------------------------------------------------------------------ graph


def test_knn_exact_matches_brute_force():
    x = synthetic_corpus(40, seed=3, noise=0, negatives=0).embeddings
    idx, dist = graph.knn_exact(x, 7, block=100)
    full = np.sqrt(np.maximum(0, 2 - 2 * x @ x.T))
    np.fill_diagonal(full, np.inf)
    want = np.sort(full, axis=1)[:, :7]
    assert np.allclose(dist, want, atol=1e-4)
    assert (idx != np.arange(len(x))[:, None]).all()


def test_knn_faiss_exact_matches_numpy_and_skips_only_itself():
    x = synthetic_corpus(40, seed=3, noise=0, negatives=0).embeddings
    x = np.concatenate([x, x[:3]])  # three identical twins: each is the other's nearest, never its own
    idx, dist = graph.knn_faiss(x, 7, exact=True)
    want_idx, want_dist = graph.knn_exact(x, 7)
    assert np.allclose(dist, want_dist, atol=1e-3)
    assert (idx != np.arange(len(x))[:, None]).all()
    n = len(x) - 3
    assert list(idx[:3, 0]) == [n, n + 1, n + 2] and list(idx[n:, 0]) == [0, 1, 2]
    assert np.mean(idx == want_idx) > 0.98  # only near-ties may swap


def test_knn_faiss_ivf_finds_most_true_neighbours_the_same_way_twice():
    x = synthetic_corpus(200, seed=4, noise=0, negatives=0).embeddings
    exact, _ = graph.knn_exact(x, 10)
    approx, dist = graph.knn_faiss(x, 10, exact=False, cell_size=256, probe=4)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall > 0.9, recall
    assert (np.diff(dist, axis=1) >= 0).all()
    again, _ = graph.knn_faiss(x, 10, exact=False, cell_size=256, probe=4)
    assert (again == approx).all()
    # graph.knn picks the inverted file only above exact_max rows
    assert (graph.knn(x, 10, exact_max=len(x))[0] == graph.knn_faiss(x, 10, exact=True)[0]).all()


def test_agglomerate_honours_threshold_and_cannot_link():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16)
    a = base + 0.05 * rng.standard_normal((4, 16))
    x = a / np.linalg.norm(a, axis=1, keepdims=True)
    edges = (np.array([0, 1, 2]), np.array([1, 2, 3]))
    assert len(set(graph.agglomerate(x, edges, 0.5))) == 1
    assert len(set(graph.agglomerate(x, edges, 1e-4))) == 4
    masks = np.array([1, 0, 0, 1], dtype=np.uint64)  # units 0 and 3 may never share a cluster
    label = graph.agglomerate(x, edges, 0.5, cannot_link=masks)
    assert label[0] != label[3]


def test_quality_scores_on_known_partitions():
    truth = [0, 0, 0, 1, 1, 2]
    assert graph.pairwise_f(truth, truth) == 1.0 and graph.bcubed_f(truth, truth) == 1.0
    merged = [0] * 6
    assert graph.pairwise_f(merged, truth) < 0.6
    assert graph.bcubed_f([0, 0, 1, 2, 2, 3], truth) < 1.0


# ------------------------------------------------------------------ quality on dev photos


def test_default_dlib_threshold_separates_dev_people(dev):
    d, _ = dev
    bounds = cluster.linkage_bounds(d.embeddings, d.labels)
    assert bounds["same_max"] < TAU < bounds["different_min"], bounds


def test_unsupervised_matches_folder_labels(dev):
    d, _ = dev
    n = len(d.labels)
    out = cluster.cluster_space([f"{i:04d}" for i in range(n)], [""] * n, [None] * n, d.embeddings, cluster.Params(threshold=TAU))
    pred = [ident if ident is not None else f"dropped-{i}" for i, ident in enumerate(out.identity)]
    assert graph.pairwise_f(pred, d.labels) >= 0.95
    assert graph.bcubed_f(pred, d.labels) >= 0.95


def noisy_dev_copy(d, neg, seed: int):
    """Labels with 10% of photos moved under wrong names and the negatives under random names."""
    rng = np.random.default_rng(seed)
    names = sorted(set(d.labels))
    labels = list(d.labels)
    for i in rng.choice(len(labels), size=round(0.1 * len(labels)), replace=False):
        labels[i] = str(rng.choice([nm for nm in names if nm != labels[i]]))
    labels += [str(rng.choice(names)) for _ in neg.labels]
    truth = list(d.labels) + list(neg.labels)
    return labels, truth, np.concatenate([d.embeddings, neg.embeddings])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_guided_removes_misplaced_and_keeps_correct(dev, seed):
    d, neg = dev
    labels, truth, emb = noisy_dev_copy(d, neg, seed)
    n = len(labels)
    out = cluster.cluster_space([f"{i:04d}" for i in range(n)], ["dev"] * n, labels, emb, cluster.Params(threshold=TAU))
    votes: dict = {}
    for ident, t in zip(out.identity, truth):
        if ident is not None:
            votes.setdefault(ident, Counter())[t] += 1
    person = {ident: c.most_common(1)[0][0] for ident, c in votes.items()}
    misplaced = [i for i in range(n) if labels[i] != truth[i]]
    correct = [i for i in range(n) if labels[i] == truth[i]]
    handled = [out.identity[i] is None or person[out.identity[i]] == truth[i] for i in misplaced]
    kept_right = [out.identity[i] is not None and person[out.identity[i]] == truth[i] for i in correct]
    assert np.mean(handled) >= 0.95, (np.mean(handled), len(misplaced))
    assert np.mean(kept_right) >= 0.98, np.mean(kept_right)
    assert len(person) == len(set(d.labels))  # one identity per dev person, none merged


@pytest.fixture(scope="session")
def variants(request, dev):
    return variant_embeddings(request.config.cache.mkdir("dlib_embeddings"))


@pytest.mark.parametrize("seed", [0, 1])
def test_no_good_photo_lost_on_dev_and_re_encoded_photos(dev, variants, seed):
    """The dev photos and every third one re-encoded five ways (grayscale, CMYK, JPEG 40,
    EXIF-rotated, 112 px crop), 10% of them misfiled, the negatives under random dev names:
    >= 99% of correctly labelled photos kept, no two people merged, >= 98% of misfiled
    photos removed or moved to their person. Without the attach distance fewer are kept."""
    from devtools.quality import measure, misfile

    d, neg = dev
    people = list(d.labels) + list(variants.labels)
    rng = np.random.default_rng(seed + 100)
    labels = misfile(people, 0.10, seed) + [str(rng.choice(sorted(set(d.labels)))) for _ in neg.labels]
    truth = people + list(neg.labels)
    emb = np.concatenate([d.embeddings, variants.embeddings, neg.embeddings])
    n = len(labels)
    ids, sources = [f"{i:05d}" for i in range(n)], ["dev"] * n
    attach = cluster.DEFAULT_ATTACH_THRESHOLDS["dlib"]
    q = measure(labels, truth, cluster.cluster_space(ids, sources, labels, emb, cluster.Params(threshold=TAU, attach=attach)).identity)
    assert q.kept_good >= 0.99 and q.merges == 0 and q.misfiled_removed >= 0.98, q
    assert q.negatives_dropped >= 0.95, q
    core_only = measure(labels, truth, cluster.cluster_space(ids, sources, labels, emb, cluster.Params(threshold=TAU)).identity)
    assert core_only.kept_good < q.kept_good, (core_only, q)


def test_attach_distance_keeps_a_margin_from_strangers(dev):
    """The procedure's check: the attach distance lies above the linkage threshold and below the
    nearest linkage of any stranger (a negative) to a dev person's photos."""
    d, neg = dev
    labels = np.array(d.labels)
    means = np.stack([d.embeddings[labels == n].mean(axis=0) for n in sorted(set(d.labels))])
    stranger = np.sqrt(np.maximum(0, 2 - 2 * neg.embeddings @ means.T)).min()
    assert TAU < cluster.DEFAULT_ATTACH_THRESHOLDS["dlib"] < stranger, stranger


def test_same_person_under_two_sources_merges_and_two_names_of_one_source_are_flagged(dev):
    d, _ = dev
    labels = np.array(d.labels)
    jolie = np.flatnonzero(labels == "Angelina_Jolie")
    blair = np.flatnonzero(labels == "George_W_Bush")
    rows = np.concatenate([jolie, blair])
    half = len(jolie) // 2
    # Jolie: half filed in source "vgg" as "Angelina_Jolie", half in "imdb" as "Angelina Jolie";
    # Bush (20 photos): half as "George_W_Bush", half as "G. W. Bush", both in source "imdb".
    sources = ["vgg"] * half + ["imdb"] * (len(jolie) - half) + ["imdb"] * len(blair)
    names = ["Angelina_Jolie"] * half + ["Angelina Jolie"] * (len(jolie) - half)
    names += ["George_W_Bush" if i % 2 else "G. W. Bush" for i in range(len(blair))]
    out = cluster.cluster_space([f"{i:04d}" for i in rows], sources, names, d.embeddings[rows], cluster.Params(threshold=TAU))
    jolie_ids = set(out.identity[: len(jolie)])
    assert len(jolie_ids) == 1 and None not in jolie_ids  # merged across sources, same person
    assert all(flag is None for flag in out.review[: len(jolie)])  # spellings normalise alike
    blair_ids = set(out.identity[len(jolie) :])
    assert len(blair_ids) == 2 and None not in blair_ids  # not merged: the source says two people
    assert all("faces coincide with" in (flag or "") for flag in out.review[len(jolie) :])


def test_merged_names_with_different_spellings_are_flagged(dev):
    d, _ = dev
    rows = np.flatnonzero(np.array(d.labels) == "Kofi_Annan")
    half = len(rows) // 2
    sources = ["vgg"] * half + ["web"] * (len(rows) - half)
    names = ["n000123"] * half + ["Kofi Annan"] * (len(rows) - half)
    out = cluster.cluster_space([f"{i:04d}" for i in rows], sources, names, d.embeddings[rows], cluster.Params(threshold=TAU))
    assert len(set(out.identity)) == 1
    assert all("differently spelled names" in flag for flag in out.review)


# ------------------------------------------------------------------ the stage on a work folder


def write_workdir(tmp_path, rows: list[dict], parts: int = 2) -> WorkDir:
    """Items and one upstream stage ("prep") holding what the face stages would have added."""
    work = WorkDir(tmp_path / "out")
    per = -(-len(rows) // parts)
    item_cols = [f.name for f in ITEM_SCHEMA]
    for p in range(parts):
        chunk = rows[p * per : (p + 1) * per]
        items = pa.Table.from_pylist([{c: r.get(c) for c in item_cols} for r in chunk], schema=ITEM_SCHEMA)
        atomic_write_table(work.part_path("items", p), items)
        prep = pa.table(
            {
                "image_id": [r["image_id"] for r in chunk],
                "status": [r["status"] for r in chunk],
                "drop_stage": [r.get("drop_stage") for r in chunk],
                "reason": [r.get("reason") for r in chunk],
                "detail": [r.get("detail") for r in chunk],
                "embedding": pa.array([r.get("embedding") for r in chunk], schema.LIST_F32),
                "embedding_model": [r.get("embedding_model") for r in chunk],
            }
        )
        work.write_part("prep", p, prep, {"partition": p})
    work.mark_done("items", {"partitions": parts})
    work.mark_done("prep", {"partitions": parts})
    return work


def synthetic_rows(seed: int = 0) -> list[dict]:
    data = synthetic_corpus(6, seed=seed, noise=0.0, negatives=0.0)
    rows = []
    for i, (vec, ident) in enumerate(zip(data.embeddings, data.identity)):
        labelled = ident < 4  # identities 0-3 have names, 4-5 come unlabeled
        rows.append(
            {
                "image_id": schema.image_id("src", f"{ident}/{i}.jpg"),
                "source": "src",
                "locator": f"{ident}/{i}.jpg",
                "label": f"person {ident}" if labelled else None,
                "status": "kept",
                "embedding": vec.tolist(),
                "embedding_model": DLIB,
            }
        )
    # a name with only 3 photos of a person seen nowhere else
    small = synthetic_corpus(1, seed=seed + 100, noise=0.0, negatives=0.0).embeddings[:3]
    for j, vec in enumerate(small):
        rows.append({"image_id": schema.image_id("src", f"small/{j}"), "source": "src", "locator": f"small/{j}", "label": "small name", "status": "kept", "embedding": vec.tolist(), "embedding_model": DLIB})
    lone = synthetic_corpus(1, seed=seed + 200, noise=0.0, negatives=0.0).embeddings[0]
    rows.append({"image_id": schema.image_id("src", "lone"), "source": "src", "locator": "lone", "label": None, "status": "kept", "embedding": lone.tolist(), "embedding_model": DLIB})
    rows.append({"image_id": schema.image_id("src", "gone"), "source": "src", "locator": "gone", "label": "person 0", "status": "dropped", "drop_stage": "detect", "reason": "no_face", "detail": "none found"})
    return rows


def run_stage(work: WorkDir, **settings) -> pa.Table:
    """The cluster step as the engine runs it (its file per partition, settled), read back."""
    remove_tree(work.stage_dir("cluster"))
    stage = cluster.ClusterStage(cluster.Settings(**settings), {"output_dir": str(work.output)})
    steps = run_stages(work, [stage], ["prep"])
    columns = ["image_id", "status", "drop_stage", "reason", "detail", "identity_id", "identity_distance", "review_flag"]
    return work.read_all(steps, columns=columns)


def test_stage_decides_every_row_and_keeps_earlier_drops(tmp_path):
    rows = synthetic_rows()
    update = run_stage(write_workdir(tmp_path, rows))
    assert update.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    out = update.to_pylist()
    by_locator = {r["locator"]: o for r, o in zip(rows, out)}
    assert by_locator["gone"]["reason"] == "no_face" and by_locator["gone"]["drop_stage"] == "detect"
    assert by_locator["lone"]["reason"] == "unclustered"
    assert {by_locator[f"small/{j}"]["reason"] for j in range(3)} == {"identity_too_small"}
    kept = [o for o in out if o["status"] == "kept"]
    assert all(o["identity_id"] and o["identity_distance"] is not None and o["identity_distance"] < TAU for o in kept)
    truth = {r["image_id"]: r["locator"].split("/")[0] for r in rows}
    groups: dict = {}
    for o in kept:
        groups.setdefault(o["identity_id"], set()).add(truth[o["image_id"]])
    assert len(groups) == 6 and all(len(v) == 1 for v in groups.values())
    for o in out:
        if o["status"] == "dropped":
            assert o["reason"] in schema.REASONS and o["detail"]


def test_identity_ids_are_stable_under_row_order(tmp_path):
    rows = synthetic_rows(seed=5)
    first = run_stage(write_workdir(tmp_path / "a", rows, parts=2)).to_pylist()
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    second = run_stage(write_workdir(tmp_path / "b", shuffled, parts=3)).to_pylist()
    ids_a = {o["image_id"]: o["identity_id"] for o in first}
    ids_b = {o["image_id"]: o["identity_id"] for o in second}
    assert ids_a == ids_b
    # a named identity's id comes from its name, not from which images it holds
    named = {o["identity_id"] for o, r in zip(first, rows) if r["label"] == "person 2" and o["identity_id"]}
    assert len(named) == 1


def test_unknown_embedding_model_is_a_clear_error(tmp_path):
    rows = synthetic_rows()
    for r in rows:
        if r.get("embedding_model"):
            r["embedding_model"] = "mystery-net"
    with pytest.raises(ValueError, match="mystery-net.*cluster.thresholds"):
        run_stage(write_workdir(tmp_path, rows))


def test_embeddings_of_different_models_are_never_compared(tmp_path):
    rows = synthetic_rows()
    arc = [dict(r, image_id=schema.image_id("arc", r["locator"]), source="arc", embedding_model="insightface:buffalo_l/w600k_r50.onnx") for r in rows if r["status"] == "kept"]
    update = run_stage(write_workdir(tmp_path, rows + arc)).to_pylist()
    model_of = {r["image_id"]: r.get("embedding_model") for r in rows + arc}
    by_identity: dict = {}
    for o in update:
        if o["identity_id"]:
            by_identity.setdefault(o["identity_id"], set()).add(model_of[o["image_id"]])
    assert by_identity and all(len(models) == 1 for models in by_identity.values())


def test_name_holding_two_people_keeps_one_and_is_flagged(dev):
    d, _ = dev
    labels = np.array(d.labels)
    rows = np.concatenate([np.flatnonzero(labels == "Kofi_Annan"), np.flatnonzero(labels == "Tony_Blair")])
    out = cluster.cluster_space([f"{i:04d}" for i in rows], ["s"] * len(rows), ["Mixed"] * len(rows), d.embeddings[rows], cluster.Params(threshold=TAU))
    kept_people = {labels[r] for r, ident in zip(rows, out.identity) if ident is not None}
    assert len(kept_people) == 1  # one person kept, the other dropped as outliers
    dropped = [reason for reason in out.reason if reason is not None]
    assert dropped and set(dropped) == {"identity_outlier"}
    assert all("two face groups" in flag for flag in out.review)

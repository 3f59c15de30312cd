"""Cluster stage: turn kept faces into clean identities of at least ``min_images`` images.

One rule decides every grouping: two sets of faces belong together when their *linkage*, the
root mean squared embedding distance over all pairs between them (datakit/graph.py), is under
the embedding model's threshold. Faces are compared only with faces embedded by the same model.

Label-guided (rows with a label):
1. Within each name (source + person key when the source gives one, else source + label) the faces are agglomerated; the largest group is the
   name's dominant face and the rest are outliers (a co-star, a mislabel, someone else).
   A name whose second group is nearly as large is kept but flagged for review.
2. Dominant groups of names and the clusters of unlabeled faces (below) are agglomerated
   once more: groups whose faces coincide become one identity. Two names of the *same* source
   are never merged (the source says they are different people) but are flagged for review;
   names of different sources merge, and are flagged when their spellings differ.
3. An outlier joins the identity whose faces it matches, if any is under the threshold
   ("reassigned", kept, said in ``detail``); otherwise it is dropped as ``identity_outlier``.

Unsupervised (rows without a label): a k-nearest-neighbour graph (exact in blocks, or an
inverted-file search above ``exact_knn_max`` rows) and average-linkage agglomeration along
its edges; cost grows near-linearly in the number of faces and no all-pairs matrix is built.

Identities with fewer than ``min_images`` images are dropped as ``identity_too_small``; an
unlabeled face that joined nobody is ``unclustered``.

Thresholds (linkage, Euclidean on L2-normalised embeddings) are per embedding model family and
live beside the backend that makes the embedding, with how each was set: dlib's 0.39 in
portrait/faces/dlib_backend.py (measured on the dev photos), ArcFace's 1.15 in
portrait/faces/insightface_backend.py (from published operating points, not measured here).

Attach distances (``cluster.attach_thresholds``), label-guided mode only: a labelled photo
outside its name's dominant group (a re-encoded copy, an odd pose or light: same person, just
past the threshold) stays with its own name's identity when that identity is the nearest of all
and its linkage to it is under the attach distance; a photo nearer to another identity is moved
there (under the threshold) or dropped, and identities still merge only under the threshold, so
the attach distance never merges two people.

How the thresholds are chosen (the procedure; re-run it for a new embedding model):
1. Embed labelled photos of known people (here the 293 dev photos, 30 people) and the same
   photos re-encoded as the web serves them (devtools/reencode.py: grayscale, CMYK,
   JPEG 40, EXIF-rotated, a 112 px face crop; re-encoding moves a dlib embedding by 0.07 at the
   median, 0.19 at the 99th percentile), and photos of strangers (the negatives).
2. Linkage threshold: between ``linkage_bounds``' same_max and different_min, on the side of
   splitting (merging two people is the worse error for training): dlib 0.39 in [0.363, 0.411].
3. Attach distance: the linkage of one photo to the other photos of its person, over the photos
   and their variants, measured 0.307 median, 0.39 at the 99th percentile, 0.479 at most; the
   nearest stranger to any person lies at 0.418. The attach distance is the largest value that
   keeps a margin below that: dlib 0.415 (its value lives with the others in ``THRESHOLDS`` of
   portrait/faces/dlib_backend.py). With it, the dev photos + variants + 10% misfiled +
   negatives keep 99.9% of correctly labelled photos (98.9-99.4% with the threshold alone),
   merge nobody and remove or move every misfiled photo (tests/test_cluster.py, make bench-quality).
4. ArcFace: not measured here (no weights offline); attach equals the threshold until it is.

Stable identity ids: the first 16 hex of sha1 of a key. For an identity holding names, the
key is the smallest ``family NUL source NUL label`` among its names, so a name keeps its id
from run to run while its images change; for an identity of unlabeled faces only, it is
``family NUL unlabeled NUL`` plus the smallest image_id among its images.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pydantic import Field

from datakit import graph
from portrait.faces import default_thresholds
from datakit.stage import Output, Stage, StageSettings, column

# pattern found in the embedding model's name (case-insensitive) -> linkage threshold
DEFAULT_THRESHOLDS: dict[str, float] = default_thresholds("cluster")
# pattern -> attach distance: a labelled photo outside its name's dominant group stays with its
# own name's identity when that identity is its nearest and within this linkage (see above)
DEFAULT_ATTACH_THRESHOLDS: dict[str, float] = default_thresholds("attach")

INPUT_COLUMNS = ("source", "label", "person_key", "embedding", "embedding_model", "review_flag")


class Settings(StageSettings):
    min_images: int = Field(default=5, ge=1, description="identities with fewer images are dropped")
    neighbors: int = Field(default=10, ge=1, description="k of the nearest-neighbour graphs")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS),
        description="embedding-model name pattern -> linkage threshold (first match wins)",
    )
    attach_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_ATTACH_THRESHOLDS),
        description="embedding-model name pattern -> the looser distance at which a labelled photo "
        "stays with its own name's identity when that is its nearest (never below the linkage threshold)",
    )
    reassign_outliers: bool = True  # a labelled photo outside its name's face group joins the identity whose mean face is nearest, within the linkage threshold (false: dropped)
    review_group_ratio: float = Field(
        default=0.5, gt=0, le=1, description="flag a name whose second face group is at least this share of the first"
    )
    exact_knn_max: int = Field(default=50_000, ge=1, description="above this many unlabeled faces, use the inverted-file kNN")
    ivf_cell_size: int = Field(default=1024, ge=16)  # inverted-file kNN: faces per cell
    ivf_probe: int = Field(default=8, ge=1)  # inverted-file kNN: nearest cells searched per face


def threshold_for(model: str, thresholds: dict[str, float]) -> float:
    for pattern, value in thresholds.items():
        if pattern.lower() in (model or "").lower():
            return value
    raise ValueError(
        f"cluster: no linkage threshold for embedding model {model!r}; add a pattern that matches it "
        f"under cluster.thresholds (known patterns: {', '.join(thresholds)})"
    )


def _attach_for(model: str, attach: dict[str, float]) -> float | None:
    return next((v for p, v in attach.items() if p.lower() in (model or "").lower()), None)


def family_of(model: str, thresholds: dict[str, float]) -> str:
    return next((p for p in thresholds if p.lower() in (model or "").lower()), model)


def normalise_name(label: str) -> str:
    text = unicodedata.normalize("NFKC", label).casefold()
    return " ".join(re.sub(r"[_\-.,]+", " ", text).split())


@dataclass
class Decisions:
    """Per-row outcome of clustering one embedding space; index-aligned with its input."""

    identity: list = field(default_factory=list)  # identity id or None
    distance: np.ndarray | None = None  # to the identity's centre, NaN when dropped
    reason: list = field(default_factory=list)  # None for kept rows
    detail: list = field(default_factory=list)
    review: list = field(default_factory=list)


@dataclass
class Params:
    threshold: float
    attach: float | None = None  # None: the same as threshold (no looser attach)
    min_images: int = 5
    neighbors: int = 10
    reassign_outliers: bool = True
    review_group_ratio: float = 0.5
    exact_knn_max: int = 50_000
    ivf_cell_size: int = 1024
    ivf_probe: int = 8
    family: str = "dlib"


def cluster_space(
    image_ids: list[str], sources: list[str], labels: list[str | None], emb: np.ndarray, p: Params, progress=None
) -> Decisions:
    """Cluster the faces of one embedding space (rows all embedded by the same model)."""
    n = len(image_ids)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    say = progress or (lambda msg: None)
    named = np.array([lab is not None for lab in labels], dtype=bool)
    name_keys = [f"{s}\0{lab}" if lab is not None else "" for s, lab in zip(sources, labels)]

    # 1. within each name: dominant group and outliers
    say("label-guided: faces within each name")
    lab_rows = np.flatnonzero(named)
    names, name_of = np.unique(np.array([name_keys[i] for i in lab_rows], dtype=object), return_inverse=True)
    dominant, outlier_rows, name_review = _dominant_groups(emb, lab_rows, name_of, len(names), p)

    # 2. unlabeled faces: kNN graph + agglomeration
    say("unsupervised: nearest-neighbour graph of unlabeled faces")
    free_rows = np.flatnonzero(~named)
    free_groups = _cluster_free(emb[free_rows], p) if free_rows.size else np.zeros(0, dtype=np.int64)

    # 3. units (named dominant groups, unlabeled clusters) -> identities
    say("merging names and clusters into identities")
    unit_rows: list[np.ndarray] = [lab_rows[dominant[g]] for g in range(len(names))]
    unit_name: list[str | None] = list(names)
    for rows in _groups_to_lists(free_groups):
        unit_rows.append(free_rows[rows])
        unit_name.append(None)
    ident_of_unit, unit_review = _merge_units(emb, unit_rows, unit_name, p)

    identity_index = np.full(n, -1, dtype=np.int64)
    for u, rows in enumerate(unit_rows):
        identity_index[rows] = ident_of_unit[u]

    # 4. outliers: reassigned to a matching identity or dropped
    reason: list = [None] * n
    detail: list = [None] * n
    review: list = [None] * n
    members_of_name = _groups_to_lists(name_of)  # name_of takes every value 0..len(names)-1
    for g, text in name_review.items():
        for r in lab_rows[members_of_name[g]]:
            review[r] = text
    for u, text in unit_review.items():
        for r in unit_rows[u]:
            review[r] = _join(review[r], text)
    own_identity = np.array([identity_index[lab_rows[rows[0]]] for rows in dominant], dtype=np.int64)
    _place_outliers(emb, lab_rows, name_of, names, own_identity, outlier_rows, identity_index, reason, detail, p)

    # 5. sizes, ids and distances
    unit_key = [""] * n  # the name of the unit a row came in with; "" for outliers and unlabeled
    for u, rows in enumerate(unit_rows):
        for r in rows:
            unit_key[r] = unit_name[u] or ""
    return _finish(image_ids, name_keys, unit_key, emb, identity_index, reason, detail, review, p)


def _dominant_groups(emb, lab_rows, name_of, n_names, p: Params):
    """Per name: row positions (into lab_rows) of its dominant group; outlier positions; review notes."""
    order = np.argsort(name_of, kind="stable")
    bounds = np.searchsorted(name_of[order], np.arange(n_names + 1))
    xs = emb[lab_rows]
    edge_a, edge_b = [], []
    for g in range(n_names):
        pos = order[bounds[g] : bounds[g + 1]]
        if pos.size < 2:
            continue
        idx = _small_knn(xs[pos], min(p.neighbors, pos.size - 1))
        rows = np.repeat(pos, idx.shape[1])
        edge_a.append(rows)
        edge_b.append(pos[idx.ravel()])
    edges = (np.concatenate(edge_a), np.concatenate(edge_b)) if edge_a else (np.zeros(0, np.int64),) * 2
    groups = graph.agglomerate(xs, edges, p.threshold)
    dominant, outliers, review = [], [], {}
    for g in range(n_names):
        pos = order[bounds[g] : bounds[g + 1]]
        ids, sizes = np.unique(groups[pos], return_counts=True)
        rank = np.lexsort((ids, -sizes))  # largest first; ties: the group of the earliest row
        top = ids[rank[0]]
        dominant.append(pos[groups[pos] == top])
        outliers.append(pos[groups[pos] != top])
        if len(rank) > 1:
            first, second = sizes[rank[0]], sizes[rank[1]]
            if second >= p.min_images and second >= p.review_group_ratio * first:
                review[g] = (
                    f"name holds two face groups ({first} and {second} photos); kept the larger, "
                    "the other is dropped or reassigned"
                )
    return dominant, np.concatenate(outliers) if outliers else np.zeros(0, np.int64), review


def _small_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Neighbour indices within one name: few rows, so a full sort beats the blocked search."""
    if x.shape[0] > 2048:
        return graph.knn_exact(x, k)[0]
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _cluster_free(x: np.ndarray, p: Params) -> np.ndarray:
    if x.shape[0] < 2:
        return np.zeros(x.shape[0], dtype=np.int64)
    idx, dist = graph.knn(
        x, min(p.neighbors, x.shape[0] - 1), exact_max=p.exact_knn_max, cell_size=p.ivf_cell_size, probe=p.ivf_probe
    )
    return graph.agglomerate(x, graph.knn_edges(idx, dist, np.inf), p.threshold)


def _groups_to_lists(labels: np.ndarray) -> list[np.ndarray]:
    if labels.size == 0:
        return []
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts)


def _merge_units(emb, unit_rows, unit_name, p: Params):
    """Identity index of each unit, and review notes per unit."""
    m = len(unit_rows)
    if m == 0:
        return np.zeros(0, dtype=np.int64), {}
    sums = np.stack([emb[r].sum(axis=0, dtype=np.float64) for r in unit_rows])
    counts = np.array([len(r) for r in unit_rows], dtype=np.int64)
    sources = sorted({k.split("\0", 1)[0] for k in unit_name if k is not None})
    bit = {s: np.uint64(1) << np.uint64(i % 64) for i, s in enumerate(sources)}
    # A name keeps apart from other names of its source only when it holds an identity's worth of
    # faces: a few misfiled faces under a stray name must not block their person's identity.
    masks = np.array(
        [bit[k.split("\0", 1)[0]] if k is not None and c >= p.min_images else np.uint64(0) for k, c in zip(unit_name, counts)],
        dtype=np.uint64,
    )
    means = sums / counts[:, None]
    centres = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    k = min(p.neighbors, m - 1)
    if k == 0:
        return np.zeros(1, dtype=np.int64), {}
    idx, dist = graph.knn(centres, k, exact_max=p.exact_knn_max, cell_size=p.ivf_cell_size, probe=p.ivf_probe)
    edges = graph.knn_edges(idx, dist, np.inf)
    label = graph.agglomerate(sums, edges, p.threshold, counts=counts, cannot_link=masks)
    _, ident = np.unique(label, return_inverse=True)
    review: dict[int, str] = {}
    # same-source names whose faces coincide: kept apart, flagged
    a, b = edges
    dots = np.einsum("ij,ij->i", means[a], means[b])
    close = 2.0 - 2.0 * dots < p.threshold**2
    for u, v, d in zip(a[close], b[close], dots[close]):
        if unit_name[u] is None or unit_name[v] is None or ident[u] == ident[v]:
            continue
        su, lu = unit_name[u].split("\0", 1)
        sv, lv = unit_name[v].split("\0", 1)
        if su == sv:
            link = np.sqrt(max(0.0, 2 - 2 * d))
            review[u] = _join(review.get(u), f"faces coincide with {lv!r} of the same source (linkage {link:.3f}); not merged")
            review[v] = _join(review.get(v), f"faces coincide with {lu!r} of the same source (linkage {link:.3f}); not merged")
    # names of different sources merged under different spellings
    members: dict[int, list[int]] = {}
    for u in range(m):
        if unit_name[u] is not None:
            members.setdefault(int(ident[u]), []).append(u)
    for units in members.values():
        spellings = {normalise_name(unit_name[u].split("\0", 1)[1]) for u in units}
        if len(spellings) > 1:
            listing = ", ".join(sorted(f"{unit_name[u].split(chr(0), 1)[1]} ({unit_name[u].split(chr(0), 1)[0]})" for u in units))
            for u in units:
                review[u] = _join(review.get(u), f"identity merges differently spelled names: {listing}")
    return ident, review


def _place_outliers(emb, lab_rows, name_of, names, own_identity, outlier_pos, identity_index, reason, detail, p: Params):
    if outlier_pos.size == 0:
        return
    n_ident = int(identity_index.max()) + 1 if identity_index.size and identity_index.max() >= 0 else 0
    rows = lab_rows[outlier_pos]
    best, best_link = np.full(rows.size, -1), np.full(rows.size, np.inf)
    if n_ident and p.reassign_outliers:
        have = identity_index >= 0
        sums = graph.group_sums(emb[have], identity_index[have], n_ident)
        means = (sums / np.bincount(identity_index[have], minlength=n_ident)[:, None]).astype(np.float32)
        for s in range(0, rows.size, 4096):
            dots = emb[rows[s : s + 4096]] @ means.T
            top = np.argmax(dots, axis=1)
            best[s : s + 4096] = top
            best_link[s : s + 4096] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * dots[np.arange(top.size), top]))
    attach = max(p.threshold, p.attach if p.attach is not None else p.threshold)
    for r, g, ident, link in zip(rows, name_of[outlier_pos], best, best_link):
        label = names[g].split("\0", 1)[1]
        if ident == own_identity[g] and link < attach:
            # its own name's identity is its nearest: a correctly labelled photo off the core
            # (a re-encoded copy, an unusual pose); kept at the looser attach distance
            identity_index[r] = ident
        elif link < p.threshold:
            identity_index[r] = ident
            if ident != own_identity[g]:
                detail[r] = f"face does not match the dominant faces of {label!r}; reassigned to the identity it matches (linkage {link:.3f})"
        else:
            reason[r] = "identity_outlier"
            nearest = f"; nearest identity at linkage {link:.3f}" if np.isfinite(link) else ""
            detail[r] = f"face does not match the dominant faces of {label!r} (threshold {p.threshold}){nearest}"


def _finish(image_ids, name_keys, unit_key, emb, identity_index, reason, detail, review, p: Params) -> Decisions:
    n = len(image_ids)
    distance = np.full(n, np.nan, dtype=np.float32)
    identity: list = [None] * n
    placed = np.flatnonzero(identity_index >= 0)
    if placed.size:
        ids, inverse, sizes = np.unique(identity_index[placed], return_inverse=True, return_counts=True)
        sums = graph.group_sums(emb[placed], inverse, ids.size)
        centres = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
        keys: list = [None] * ids.size
        for r, c in zip(placed, inverse):
            # the names of an identity's units decide its key (not the labels of reassigned
            # outliers); an identity without names takes its smallest image_id
            key = (0, f"{p.family}\0{unit_key[r]}") if unit_key[r] else (1, f"{p.family}\0unlabeled\0{image_ids[r]}")
            if keys[c] is None or key < keys[c]:
                keys[c] = key
        id_of = [hashlib.sha1(k[1].encode()).hexdigest()[:16] for k in keys]
        dist_placed = np.linalg.norm(emb[placed] - centres[inverse], axis=1)
        for r, c, dist in zip(placed, inverse, dist_placed):
            if sizes[c] == 1 and not name_keys[r]:
                reason[r], detail[r] = "unclustered", f"no other face within linkage {p.threshold}"
            elif sizes[c] < p.min_images:
                reason[r] = "identity_too_small"
                detail[r] = f"identity {id_of[c]} has {sizes[c]} images; cluster.min_images is {p.min_images}"
            else:
                identity[r] = id_of[c]
                distance[r] = dist
    return Decisions(identity=identity, distance=distance, reason=reason, detail=detail, review=review)


def _join(a: str | None, b: str | None) -> str | None:
    if not a:
        return b
    if not b or b in a:
        return a
    return f"{a}; {b}"


def linkage_bounds(emb: np.ndarray, labels, halves: int = 20, seed: int = 0) -> dict[str, float]:
    """How to choose a threshold from labelled embeddings of one model.

    ``same_max``: the largest linkage between two random halves of one person's photos;
    ``different_min``: the smallest linkage between two different people. A threshold between
    them separates people on this data.
    """
    labels = np.asarray(labels)
    names = sorted(set(labels.tolist()))
    rng = np.random.default_rng(seed)
    same = []
    for name in names:
        rows = np.flatnonzero(labels == name)
        for _ in range(halves if rows.size >= 2 else 0):
            rng.shuffle(rows)
            half = rows.size // 2
            same.append(graph.linkage(emb[rows[:half]], emb[rows[half:]]))
    means = np.stack([emb[labels == nm].mean(axis=0, dtype=np.float64) for nm in names])
    dots = means @ means.T
    np.fill_diagonal(dots, -np.inf)
    return {
        "same_max": float(max(same)),
        "different_min": float(np.sqrt(max(0.0, 2.0 - 2.0 * dots.max()))),
    }


# ------------------------------------------------------------------ the stage


class ClusterStage(Stage):
    name = "cluster"
    kind = "global"
    Settings = Settings
    reads = INPUT_COLUMNS
    adds = ("identity_id", "identity_distance", "review_flag", "detail")

    def process(self, table: pa.Table) -> Output:
        """Identity of every row (the live rows of the build), or why it has none."""
        s: Settings = self.settings
        n = table.num_rows
        col = {c: column(table, c) for c in ("image_id", "source", "label", "person_key", "embedding_model")}
        out = Output({"identity_id": [None] * n, "review_flag": column(table, "review_flag"), "detail": [None] * n})
        distance = np.full(n, np.nan, dtype=np.float32)
        embeddings = table.column("embedding")
        spaces: dict[str, list[int]] = {}
        for i in range(n):
            if embeddings[i].is_valid and col["embedding_model"][i]:
                spaces.setdefault(col["embedding_model"][i], []).append(i)
            else:
                out.drops[i] = ("unclustered", "kept by earlier stages but has no embedding")
        for model in sorted(spaces):
            rows = spaces[model]
            p = Params(
                threshold=threshold_for(model, s.thresholds), family=family_of(model, s.thresholds),
                attach=_attach_for(model, s.attach_thresholds),
                min_images=s.min_images, neighbors=s.neighbors, reassign_outliers=s.reassign_outliers,
                review_group_ratio=s.review_group_ratio, exact_knn_max=s.exact_knn_max,
                ivf_cell_size=s.ivf_cell_size, ivf_probe=s.ivf_probe,
            )  # fmt: skip
            emb = _embedding_matrix(embeddings.take(rows), model)
            labels = [_name_key(col["person_key"][i], col["label"][i]) for i in rows]
            d = cluster_space([col["image_id"][i] for i in rows], [col["source"][i] or "" for i in rows], labels, emb, p)
            for j, i in enumerate(rows):
                out.values["review_flag"][i] = _join(out.values["review_flag"][i], d.review[j])
                if d.reason[j] is None:
                    out.values["identity_id"][i], distance[i] = d.identity[j], d.distance[j]
                    out.values["detail"][i] = d.detail[j] or None
                else:
                    out.drops[i] = (d.reason[j], d.detail[j])
        out.values["identity_distance"] = [None if np.isnan(v) else float(v) for v in distance]
        return out


def _name_key(person_key: str | None, label: str | None) -> str | None:
    """What makes a name within a source: the source's person key when it has one (IMDb-Face's
    nm id, VGGFace2's class id), so two spellings of one person's name are one name; else the label."""
    key = _clean_label(person_key)
    return f"key:{key}" if key is not None else _clean_label(label)


def _clean_label(label: str | None) -> str | None:
    if label is None or not label.strip():
        return None
    return label


def _embedding_matrix(column: pa.ChunkedArray, model: str) -> np.ndarray:
    lengths = set(pa.compute.list_value_length(column).to_pylist())
    if len(lengths) != 1:
        raise ValueError(f"cluster: embeddings of model {model!r} have different lengths {sorted(lengths)}")
    flat = pa.compute.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(column), lengths.pop())

"""Dedup stage (global): exact and near duplicates, within and across sources.

Only items still kept take part. In each group of duplicates one image stays and every other is
dropped with ``duplicate_of`` = the one that stays and a ``detail`` that names it.

Which one stays (the same rule for both kinds): the most pixels (width x height), then the
source that comes first in the recipe (``context["source_order"]`` when the runner gives it,
else the order in which sources first appear in the items, which is recipe order), then the
smaller image_id. Every input row has a place in that order, so the choice is deterministic.

1. Exact: same sha256 of the bytes -> ``duplicate_exact``.
2. Near: a 64-bit perceptual hash (imagehash's phash) of the image and of its mirror image, so a
   horizontally flipped copy matches. Two images are candidates when either orientation is
   within ``phash_threshold`` bits; a candidate is confirmed only when both have an identity
   embedding from the same model and their distance is under that model's
   ``max_embedding_distance`` -> ``duplicate_near``. Without embeddings (no face stages ran)
   only exact duplicates are removed. Images go from best to worst by the rule above; an image
   is dropped when a confirmed twin that ranks higher is still kept, and names the best such twin.

Why both signals: on the fixture photos a flipped, re-encoded JPEG copy is 0-2 bits from the
original's mirror hash while different photos are 12+ bits apart, but dlib's embedding of a
mirrored face moves by up to ~0.19 (L2-normalised), as far as the closest photos of the same
person (~0.17); the hash separates copies from re-shoots, the embedding guards against two
different people whose hashes happen to collide.

Candidate search is not all-pairs: the 64 bits are cut into ``phash_threshold + 1`` bands, and
two hashes within the threshold agree exactly on at least one band (pigeonhole), so only images
sharing a band value are compared (vectorised popcounts per bucket).

The phash needs the pixels: the partition step ``phash`` (datakit/stages/phash.py) computes it
before this step, which reads only narrow columns.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from pydantic import Field

from portrait.faces import default_thresholds
from datakit.stage import Output, Stage, StageSettings, column

log = logging.getLogger(__name__)

HASH_BITS = 64

# L2 distance between L2-normalised embeddings under which two faces are the same picture,
# per embedding model (set and explained beside each face backend in portrait/faces/).
DEFAULT_MAX_EMBEDDING_DISTANCE = default_thresholds("dedup")

READ_COLUMNS = ("source", "sha256", "width", "height", "embedding", "embedding_model", "phash", "phash_mirror")


class DedupSettings(StageSettings):
    near: bool = True  # false: exact duplicates only
    phash_threshold: int = Field(default=4, ge=0, le=16)  # Hamming distance (bits of 64) for a near-duplicate candidate
    # first key found in the embedding_model name (case-insensitive) gives the threshold
    max_embedding_distance: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MAX_EMBEDDING_DISTANCE))


# ---------------------------------------------------------------- hashes


def hex_to_u64(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 array, mask of rows that have a hash)."""
    present = np.array([v is not None for v in values], dtype=bool)
    out = np.zeros(len(values), dtype=np.uint64)
    out[present] = np.array([int(v, 16) for v in values if v is not None], dtype=np.uint64)
    return out, present


# ---------------------------------------------------------------- candidate search


def band_slices(threshold: int) -> list[tuple[int, int]]:
    """threshold + 1 contiguous bit ranges (shift, width) covering the 64 bits."""
    n = threshold + 1
    widths = [HASH_BITS // n + (1 if i < HASH_BITS % n else 0) for i in range(n)]
    shifts = np.cumsum([0] + widths[:-1])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int16)


def near_hash_pairs(hashes: np.ndarray, mirrors: np.ndarray, threshold: int, block: int = 1024) -> np.ndarray:
    """Index pairs (i < j) whose hashes are within ``threshold`` bits in either orientation.

    Returns an (n, 3) int64 array: i, j, Hamming distance (the smaller of image-vs-image and
    image-vs-mirror). Only images sharing one band value (of the image or the mirror hash) are
    compared; by pigeonhole that misses no pair within the threshold.
    """
    n = len(hashes)
    found = []
    index = np.concatenate([np.arange(n), np.arange(n)])
    for shift, width in band_slices(threshold):
        mask = np.uint64((1 << width) - 1)
        keys = np.concatenate([(hashes >> np.uint64(shift)) & mask, (mirrors >> np.uint64(shift)) & mask])
        order = np.lexsort((index, keys))
        k, idx = keys[order], index[order]
        keep = np.ones(len(k), dtype=bool)
        keep[1:] = (k[1:] != k[:-1]) | (idx[1:] != idx[:-1])  # an image whose two hashes share the key: once
        k, idx = k[keep], idx[keep]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            found.extend(_bucket_pairs(idx[s:e], hashes, mirrors, threshold, block))
    if not found:
        return np.zeros((0, 3), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs


def _bucket_pairs(members: np.ndarray, hashes, mirrors, threshold: int, block: int) -> list[np.ndarray]:
    out = []
    h, m = hashes[members], mirrors[members]
    for start in range(0, len(members), block):
        rows = slice(start, start + block)
        dist = np.minimum(hamming(h[rows, None], h[None, :]), hamming(h[rows, None], m[None, :]))
        dist = np.minimum(dist, hamming(m[rows, None], h[None, :]))
        a, b = np.nonzero(dist <= threshold)
        i, j = members[rows][a], members[b]
        upper = i < j
        out.append(np.stack([i[upper], j[upper], dist[a, b][upper]], axis=1).astype(np.int64))
    return out


# ---------------------------------------------------------------- keep rule


def keep_order(table: pa.Table, source_order: list[str]) -> np.ndarray:
    """rank[i]: position of row i in the keep order (0 is kept first)."""
    rank_of_source = {s: r for r, s in enumerate(source_order)}
    widths = table.column("width").to_pylist() if "width" in table.column_names else [None] * table.num_rows
    heights = table.column("height").to_pylist() if "height" in table.column_names else [None] * table.num_rows
    sources, ids = table.column("source").to_pylist(), table.column("image_id").to_pylist()
    keys = [
        (-((w or 0) * (h or 0)), rank_of_source.get(s, len(rank_of_source)), image_id)
        for w, h, s, image_id in zip(widths, heights, sources, ids)
    ]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return rank


def sources_in_order(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table.column("source").to_pylist()))


# ---------------------------------------------------------------- stage


class DedupStage(Stage):
    name = "dedup"
    kind = "global"
    Settings = DedupSettings
    reads = READ_COLUMNS
    adds = ("duplicate_of",)

    def process(self, table: pa.Table) -> Output:
        out = Output({"duplicate_of": [None] * table.num_rows})
        source_order = list(self.context.get("source_order") or []) + sources_in_order(table)
        rank = keep_order(table, list(dict.fromkeys(source_order)))
        exact = self._exact(table, rank, out)
        log.info("dedup: %d exact duplicates", exact)
        if self.settings.near and pa.compute.any(pa.compute.is_valid(table.column("embedding"))).as_py():
            near = self._near(table, rank, out)
            log.info("dedup: %d near duplicates", near)
        elif self.settings.near:
            log.info("dedup: no embeddings (face stages did not run): exact duplicates only")
        return out

    def _drop(self, out: Output, i: int, reason: str, kept_id: str, detail: str) -> None:
        out.drops[i] = (reason, detail)
        out.values["duplicate_of"][i] = kept_id

    def _exact(self, table: pa.Table, rank: np.ndarray, out: Output) -> int:
        groups: dict[str, list[int]] = {}
        for i, digest in enumerate(table.column("sha256").to_pylist()):
            if digest:
                groups.setdefault(digest, []).append(i)
        ids = table.column("image_id").to_pylist()
        dropped = 0
        for digest, rows in groups.items():
            if len(rows) < 2:
                continue
            rows.sort(key=rank.__getitem__)
            kept = rows[0]
            for i in rows[1:]:
                detail = f"same bytes (sha256 {digest[:12]}...) as {ids[kept]} (source {out_source(table, kept)})"
                self._drop(out, i, "duplicate_exact", ids[kept], detail)
                dropped += 1
        return dropped

    def _near(self, table: pa.Table, rank: np.ndarray, out: Output) -> int:
        live = np.array([i not in out.drops for i in range(table.num_rows)], dtype=bool)
        hashes, has_hash = hex_to_u64(column(table, "phash"))
        mirrors, _ = hex_to_u64(column(table, "phash_mirror"))
        rows = np.flatnonzero(live & has_hash)
        pairs = near_hash_pairs(hashes[rows], mirrors[rows], self.settings.phash_threshold)
        if len(pairs) == 0:
            return 0
        i, j, bits = rows[pairs[:, 0]], rows[pairs[:, 1]], pairs[:, 2]
        distances = self._embedding_distances(table, i, j)
        confirmed = ~np.isnan(distances)
        confirmed[confirmed] = distances[confirmed] <= self._thresholds(table, i[confirmed])
        log.info("dedup: %d phash candidate pairs, %d confirmed by embedding", len(pairs), int(confirmed.sum()))

        twins: dict[int, list[tuple[int, int, float]]] = {}
        for a, b, d_bits, dist in zip(i[confirmed], j[confirmed], bits[confirmed], distances[confirmed]):
            twins.setdefault(int(a), []).append((int(b), int(d_bits), float(dist)))
            twins.setdefault(int(b), []).append((int(a), int(d_bits), float(dist)))
        ids = table.column("image_id").to_pylist()
        dropped = 0
        for row in sorted(twins, key=rank.__getitem__):
            better = [t for t in twins[row] if rank[t[0]] < rank[row] and t[0] not in out.drops]
            if not better:
                continue
            kept, d_bits, dist = min(better, key=lambda t: rank[t[0]])
            detail = (
                f"near-duplicate of {ids[kept]} (source {out_source(table, kept)}): phash {d_bits} bits apart "
                f"(either orientation), embedding distance {dist:.3f}"
            )
            self._drop(out, row, "duplicate_near", ids[kept], detail)
            dropped += 1
        return dropped

    def _embedding_distances(self, table: pa.Table, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """L2 distance of the normalised embeddings of each pair; NaN when not comparable."""
        needed = np.unique(np.concatenate([i, j]))
        position = {int(r): p for p, r in enumerate(needed)}
        vectors = table.column("embedding").take(pa.array(needed)).to_pylist()
        models = (
            table.column("embedding_model").take(pa.array(needed)).to_pylist()
            if "embedding_model" in table.column_names
            else [None] * len(needed)
        )
        out = np.full(len(i), np.nan, dtype=np.float64)
        for k, (a, b) in enumerate(zip(i, j)):
            ia, ib = position[int(a)], position[int(b)]
            va, vb = vectors[ia], vectors[ib]
            if va is None or vb is None or models[ia] != models[ib] or len(va) != len(vb):
                continue
            va, vb = np.asarray(va, np.float64), np.asarray(vb, np.float64)
            out[k] = np.linalg.norm(va / np.linalg.norm(va) - vb / np.linalg.norm(vb))
        return out

    def _thresholds(self, table: pa.Table, rows: np.ndarray) -> np.ndarray:
        if "embedding_model" in table.column_names:
            models = table.column("embedding_model").take(pa.array(rows)).to_pylist()
        else:
            models = [None] * len(rows)
        return np.array([self.threshold_for(m) for m in models], dtype=np.float64)

    def threshold_for(self, model: str | None) -> float:
        name = (model or "").lower()
        for key, value in self.settings.max_embedding_distance.items():
            if key.lower() in name:
                return value
        raise ValueError(
            f"dedup: no max_embedding_distance for embedding model {model!r}; add an entry whose key "
            f"occurs in that name under dedup.max_embedding_distance (have: {self.settings.max_embedding_distance})"
        )


def out_source(table: pa.Table, row: int) -> str:
    return table.column("source")[row].as_py()

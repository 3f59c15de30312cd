"""Synthetic identity embeddings shaped like dlib's, for clustering tests and benchmarks.

An image of identity i is ``normalise(a * m + b * u_i + c * e)``: ``m`` a direction every face
shares, ``u_i`` the identity's own random direction, ``e`` per-image noise. The weights give
dlib-like distances (median same-person distance ~0.3, different people ~0.6, with a tail of
look-alikes). Cluster sizes follow the paper's corpus: minimum 5, mean ~28, a long tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHARED, OWN = 0.82, 0.138  # squared weights of m and u_i; the noise takes the rest (per identity)


@dataclass
class Synthetic:
    embeddings: np.ndarray  # (n, dim) float32, unit rows
    identity: np.ndarray  # (n,) int64 true identity
    labels: list[str]  # the name each image is filed under (noisy)
    misplaced: np.ndarray  # (n,) bool: filed under a name that is not its identity's


def cluster_sizes(n_identities: int, rng: np.random.Generator, min_size: int = 5, mean_size: float = 28.0, cap: int = 2000) -> np.ndarray:
    extra = rng.lognormal(mean=np.log(mean_size - min_size) - 0.5, sigma=1.0, size=n_identities)
    return np.minimum(cap, min_size + np.round(extra)).astype(np.int64)


def identity_embeddings(sizes: np.ndarray, rng: np.random.Generator, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    k = len(sizes)
    shared = np.zeros(dim, dtype=np.float32)
    shared[0] = 1.0
    own = rng.standard_normal((k, dim)).astype(np.float32)
    own[:, 0] = 0.0
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    noise_sq = rng.uniform(0.025, 0.06, size=k).astype(np.float32)
    identity = np.repeat(np.arange(k), sizes)
    n = identity.size
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in blocks: 960k x 128 noise at once would double the peak
        ids = identity[start : start + 65536]
        e = rng.standard_normal((ids.size, dim)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        x = np.sqrt(SHARED) * shared + np.sqrt(OWN) * own[ids] + np.sqrt(noise_sq[ids])[:, None] * e
        out[start : start + ids.size] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, identity


def synthetic_corpus(
    n_identities: int, seed: int = 0, noise: float = 0.10, negatives: float = 0.02, dim: int = 128
) -> Synthetic:
    """Identities filed under names ``person-<i>``; ``noise`` of the images are filed under a wrong
    name, and ``negatives`` (as a share of all images) are faces of people seen once, filed under
    random names."""
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(n_identities, rng)
    emb, identity = identity_embeddings(sizes, rng, dim)
    n_neg = int(round(negatives * identity.size))
    if n_neg:
        neg, _ = identity_embeddings(np.ones(n_neg, dtype=np.int64), rng, dim)
        emb = np.concatenate([emb, neg])
        identity = np.concatenate([identity, n_identities + np.arange(n_neg)])
    filed = np.where(identity < n_identities, identity, rng.integers(0, n_identities, size=identity.size))
    moved = rng.random(identity.size) < noise
    moved &= (identity < n_identities) & (n_identities > 1)
    shift = rng.integers(1, max(2, n_identities), size=identity.size)
    filed = np.where(moved, (filed + shift) % n_identities, filed)
    labels = [f"person-{i:06d}" for i in filed]
    return Synthetic(embeddings=emb, identity=identity, labels=labels, misplaced=filed != identity)

"""How well a build keeps good photos and cleans identities, measured against known people.

Each item has the label it was filed under and its truth: the person in the photo (a dev
identity), or ``negative:...`` for someone outside the dev people. ``identity`` is the identity a
build put it in, or None when it was dropped. Used by tests/test_cluster.py and
benchmarks/bench_quality.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from datakit import graph


def misfile(labels: list[str], fraction: float, seed: int) -> list[str]:
    """The labels with ``fraction`` of them moved to another of the names (a seeded choice)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    out = list(labels)
    for i in rng.choice(len(out), size=round(fraction * len(out)), replace=False):
        out[i] = str(rng.choice([n for n in names if n != out[i]]))
    return out


@dataclass
class Quality:
    kept_good: float  # correctly labelled photos of dev people kept, in their person's identity
    misfiled_removed: float  # misfiled photos dropped or moved to their true person's identity
    negatives_dropped: float  # photos of other people (under dev names) dropped
    merges: int  # identities that hold the majority of two or more dev people
    bcubed_f: float  # BCubed F of the kept photos of dev people against the truth
    good: int
    misfiled: int
    negatives: int

    def row(self) -> dict:
        return {
            "kept-good": f"{self.kept_good:.1%} of {self.good}",
            "misfiled-removed": f"{self.misfiled_removed:.1%} of {self.misfiled}",
            "negatives-dropped": f"{self.negatives_dropped:.1%} of {self.negatives}",
            "merges": str(self.merges),
            "BCubed F": f"{self.bcubed_f:.3f}",
        }


def measure(labels: list[str], truth: list[str], identity: list[str | None]) -> Quality:
    people = sorted({t for t in truth if not t.startswith("negative:")})
    # each identity stands for the person most of its photos show
    votes: dict[str, Counter] = {}
    for ident, t in zip(identity, truth):
        if ident is not None:
            votes.setdefault(ident, Counter())[t] += 1
    person_of = {ident: c.most_common(1)[0][0] for ident, c in votes.items()}
    # the identity holding most of a person's kept photos; two people sharing one is a merge
    home: dict[str, str] = {}
    for p in people:
        c = Counter(ident for ident, t in zip(identity, truth) if t == p and ident is not None)
        if c:
            home[p] = c.most_common(1)[0][0]
    merges = sum(n - 1 for n in Counter(home.values()).values() if n > 1)
    good = [i for i, (lab, t) in enumerate(zip(labels, truth)) if lab == t]
    misfiled = [i for i, (lab, t) in enumerate(zip(labels, truth)) if lab != t and not t.startswith("negative:")]
    negatives = [i for i, t in enumerate(truth) if t.startswith("negative:")]
    right = [identity[i] is not None and person_of[identity[i]] == truth[i] for i in good]
    handled = [identity[i] is None or person_of[identity[i]] == truth[i] for i in misfiled]
    neg_dropped = [identity[i] is None or person_of[identity[i]] == truth[i] for i in negatives]
    kept = [i for i, t in enumerate(truth) if identity[i] is not None and not t.startswith("negative:")]
    bcubed = graph.bcubed_f([identity[i] for i in kept], [truth[i] for i in kept]) if kept else 0.0
    return Quality(
        kept_good=float(np.mean(right)) if right else 0.0,
        misfiled_removed=float(np.mean(handled)) if handled else 1.0,
        negatives_dropped=float(np.mean(neg_dropped)) if neg_dropped else 1.0,
        merges=merges,
        bcubed_f=float(bcubed),
        good=len(good),
        misfiled=len(misfiled),
        negatives=len(negatives),
    )

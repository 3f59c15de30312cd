"""Run the detect, filter and embed stages in-process on the face fixtures, once per test session.

The dev set through detect + embed takes ~25 s on one core; ``lru_cache`` keeps each result for
every test module of the session. Input tables look like the download stage's output: one row
per file, ``image_bytes``, and the file dropped as ``undecodable`` (or another decode reason)
when ``portrait.decode`` refuses it, as download does.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from portrait.decode import DecodeError, decode_image
from datakit.engine.steps import decide
from datakit.store import overlay

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared" / "fixtures" / "faces"
DEV = FACES / "dev"
NEGATIVES = FACES / "negatives"


def sources(folder: Path) -> list[dict]:
    with open(folder / "SOURCES.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def input_table(paths: list[Path], labels: list[str | None] | None = None, blobs: list[bytes] | None = None) -> pa.Table:
    rows = []
    for i, path in enumerate(paths):
        data = blobs[i] if blobs is not None else path.read_bytes()
        row = {
            "image_id": f"{i:05d}",
            "locator": str(path),
            "label": labels[i] if labels else None,
            "status": "kept",
            "drop_stage": None,
            "reason": None,
            "detail": None,
            "image_bytes": data,
        }
        try:
            decode_image(data)
        except DecodeError as e:
            row.update(status="dropped", drop_stage="download", reason=e.reason, detail=e.detail)
        rows.append(row)
    return pa.Table.from_pylist(rows)


def run_stages(table: pa.Table, faces: dict | None = None, stages=("detect", "filter", "embed"), settings=None) -> pa.Table:
    """The table after the named stages, each built and set up as a runner worker would."""
    from datakit import registry

    context = {"faces": faces, "recipe_dir": None}
    for name in stages:
        cls = registry.stage_class(name)
        stage = cls(cls.Settings.model_validate((settings or {}).get(name, {})), context)
        stage.setup()
        table = overlay(table, decide(stage, table), where=name)
    return table


@lru_cache(maxsize=None)
def dev_result() -> tuple[pa.Table, tuple[str, ...]]:
    rows = sources(DEV)
    paths = [DEV / r["file"] for r in rows]
    table = run_stages(input_table(paths, [r["identity"] for r in rows]))
    return table, tuple(r["image_kind"] for r in rows)


@lru_cache(maxsize=None)
def negatives_result() -> tuple[pa.Table, tuple[str, ...]]:
    paths = sorted(p for p in NEGATIVES.glob("*/*") if p.is_file())
    table = run_stages(input_table(paths), stages=("detect", "filter"))
    return table, tuple(p.parent.name for p in paths)


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    _, index, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[index]  # 1-based, ties share their mean rank
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))

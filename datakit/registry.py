"""The stages a recipe can name, in the one order they run, and the steps each runs as.

Each entry is ``recipe stage -> ["module:Class", ...]``: most stages are one step; a stage whose
work needs image bytes before a global decision runs a partition step first (``dedup`` hashes
each partition's images in ``phash``; ``shard`` encodes each partition's samples in
``shard_encode``, then plans and writes the tars). The last step holds the recipe's
``Settings``. Imports are lazy so that loading a recipe only imports what it uses.
"""

from __future__ import annotations

import importlib

STAGES: dict[str, list[str]] = {
    "download": ["datakit.stages.download:DownloadStage"],
    "detect": ["datakit.stages.detect:DetectStage"],
    "filter": ["datakit.stages.filter:FilterStage"],
    "embed": ["datakit.stages.embed:EmbedStage"],
    "attributes": ["datakit.stages.attributes:AttributesStage"],
    "dedup": ["datakit.stages.phash:PhashStage", "datakit.stages.dedup:DedupStage"],
    "cluster": ["datakit.stages.cluster:ClusterStage"],
    "caption": ["datakit.stages.caption:CaptionStage"],
    "shard": ["datakit.stages.shard.encode:ShardEncodeStage", "datakit.stages.shard.plan:ShardStage"],
}

# every step (its work-folder name) in run order; tests/test_engine.py keeps it in step with STAGES
STEPS: list[str] = [
    "download", "detect", "filter", "embed", "attributes", "phash", "dedup", "cluster", "caption", "shard_encode", "shard",
]  # fmt: skip


def _load(path: str):
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def stage_class(name: str):
    """The class that holds recipe stage ``name``'s Settings (its last step)."""
    return _load(STAGES[name][-1])


def step_classes(name: str) -> list:
    return [_load(path) for path in STAGES[name]]


def ordered(names) -> list[str]:
    return [n for n in STAGES if n in set(names)]

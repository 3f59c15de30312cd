"""The stages a recipe can name, in the one order they run.

Each entry is ``name -> "module:Class"``; the module holds the stage and its ``Settings``.
Imports are lazy so that loading a recipe only imports what it uses.
"""

from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "download": "datakit.download:DownloadStage",
    "detect": "datakit.detect:DetectStage",
    "filter": "datakit.filter:FilterStage",
    "embed": "datakit.embed:EmbedStage",
    "attributes": "datakit.attributes:AttributesStage",
    "dedup": "datakit.dedup:DedupStage",
    "cluster": "datakit.cluster:ClusterStage",
    "caption": "datakit.caption:CaptionStage",
    "shard": "datakit.shard:ShardStage",
    # detect, filter, embed, attributes, dedup, cluster, caption, shard are added here as they land
}


def stage_class(name: str):
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def ordered(names) -> list[str]:
    return [n for n in STAGES if n in set(names)]

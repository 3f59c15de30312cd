"""The plan of a build: the recipe's stages as steps, grouped into segments that run together.

Consecutive partition steps form one segment (partition 7 can be in ``detect`` while partition
8 still downloads); each global step is a segment of its own and starts when everything before
it is done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from datakit import registry
from datakit.recipe import Recipe
from datakit.stage import Stage


@dataclass(frozen=True)
class Step:
    name: str  # the work-folder name, e.g. "phash"
    cls: type[Stage]
    settings: Any  # the recipe stage's settings (a step of a recipe stage shares them)

    @property
    def kind(self) -> str:
        return self.cls.kind

    def build(self, context: dict) -> Stage:
        return self.cls(self.settings, context)


def steps(recipe: Recipe) -> list[Step]:
    out = []
    for name in recipe.stage_names():
        settings = recipe.stage_settings(name)
        out.extend(Step(cls.name, cls, settings) for cls in registry.step_classes(name))
    return out


def segments(plan: list[Step]) -> list[list[Step]]:
    out: list[list[Step]] = []
    for step in plan:
        if step.kind == "partition" and out and out[-1][0].kind == "partition":
            out[-1].append(step)
        else:
            out.append([step])
    return out


def pools(segment: list[Step], fuse: bool = True) -> list[list[Step]]:
    """The steps of a partition segment that share a worker pool. With ``fuse``, consecutive
    steps that need no GPU and set no ``concurrency`` of their own share one: each worker runs
    a partition through all of them in turn, so a 2-core machine runs two busy processes instead
    of a pool per step (each idle Ray worker costs CPU, and the steps wait on each other). A GPU
    step keeps a pool of its own, so the CPU steps around it (decoding) never hold the GPU."""
    out: list[list[Step]] = []
    for step in segment:
        alone = not fuse or step.settings.num_gpus or step.settings.concurrency
        if out and not alone and not out[-1][-1].settings.num_gpus and not out[-1][-1].settings.concurrency:
            out[-1].append(step)
        else:
            out.append([step])
    return out


# ---------------------------------------------------------------- fingerprints
#
# A partition of a step is reused when the fingerprint it was written with equals the one the
# current recipe and sources give it. The fingerprint chains: the step's own settings (without
# where or how it runs), the model files it uses and the recipe-wide settings it reads, over
# the fingerprint of the partition it reads (the step before it, or the enumerated items).
# A global step reads every partition, so its fingerprint covers all of them.

SCHEDULING_KEYS = {"num_cpus", "num_gpus", "concurrency"}  # where and how a step runs, not what it makes


def digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def step_inputs(step: Step, context: dict) -> dict:
    """What a step's answer depends on besides its input rows."""
    out = {
        "step": step.name,
        "settings": step.settings.model_dump(mode="json", exclude=SCHEDULING_KEYS),
        "models": step.cls.provenance(step.settings, context),
    }
    faces = context.get("faces")
    if step.cls.uses_model and faces is not None:
        out["faces"] = faces.model_dump(mode="json") if hasattr(faces, "model_dump") else faces
    if step.kind == "global":
        out["source_order"] = context.get("source_order")
    return out


def partition_fingerprints(plan: list[Step], own: dict[str, str], items: list[str]) -> dict[str, list[str]]:
    """step -> fingerprint of each partition; ``own``: step -> digest of its step_inputs;
    ``items``: the digest of each enumerated items partition."""
    out: dict[str, list[str]] = {}
    before = items
    for step in plan:
        if step.kind == "partition":
            current = [digest([own[step.name], fp]) for fp in before]
        else:
            current = [digest([own[step.name], *before])] * len(before)
        out[step.name] = current
        before = current
    return out

"""The plan of a build: the recipe's stages as steps, grouped into segments that run together.

Consecutive partition steps form one segment (partition 7 can be in ``detect`` while partition
8 still downloads); each global step is a segment of its own and starts when everything before
it is done.
"""

from __future__ import annotations

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

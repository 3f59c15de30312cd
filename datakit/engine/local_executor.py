"""Run a plan in this process, no Ray: the same steps, the same work folder, the same bytes.

For small builds, for a machine without Ray, and for tests of stages. Partitions go one after
another through every step of a segment; a global step's fan-out is a plain loop.
"""

from __future__ import annotations

from contextlib import contextmanager

from datakit.engine import steps as run_steps
from datakit.engine.plan import Step
from datakit.stage import sequential_map
from datakit.store import WorkDir


class LocalExecutor:
    name = "local"

    @contextmanager
    def session(self, address: str | None, num_cpus: int | None, log_dir):
        """Nothing to start, no logs but datakit's own."""
        yield

    def run_partitions(self, work: WorkDir, segment: list[Step], upstream: list[str], context: dict,
                       pending: list[int]) -> None:
        stages = []
        for step in segment:
            stage = step.build(context)
            stage.setup()
            stages.append(stage)
        for part in pending:
            for i, stage in enumerate(stages):
                run_steps.run_partition(stage, work, part, upstream + [s.name for s in segment[:i]])

    def run_global(self, work: WorkDir, step: Step, upstream: list[str], context: dict) -> None:
        stage = step.build(context)
        stage.setup()
        stage.fan_out = sequential_map
        run_steps.run_global(stage, work, upstream)


def run_stages(work: WorkDir, stages: list, upstream: list[str]) -> list[str]:
    """Run built stages, in order, over every partition of a work folder in this process
    (a global stage over all of them); returns ``upstream`` with the steps run added."""
    done = list(upstream)
    for stage in stages:
        stage.setup()
        if stage.kind == "global":
            run_steps.run_global(stage, work, done)
        else:
            for part in range(work.num_parts()):
                run_steps.run_partition(stage, work, part, done)
            work.mark_done(stage.name, {"partitions": work.num_parts()})
        done.append(stage.name)
    return done

"""Run a plan in this process, no Ray: the same steps, the same work folder, the same bytes.

For small builds, for a machine without Ray, and for tests of stages. Partitions go one after
another through every step of a segment; a global step's fan-out is a plain loop.
"""

from __future__ import annotations

from datakit.engine import steps as run_steps
from datakit.engine.plan import Step
from datakit.stage import sequential_map
from datakit.store import WorkDir


class LocalExecutor:
    name = "local"

    def start(self, address: str | None, num_cpus: int | None) -> None:
        """Nothing to start."""

    def save_logs(self, log_dir) -> None:
        """No logs but datakit's own."""

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

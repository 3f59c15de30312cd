"""Run a plan on Ray: the only module that imports Ray.

Each segment of partition steps is one Ray Data pipeline over partition numbers, with an actor
pool per step (a model is loaded once per actor); the data itself moves through the work
folder, one atomic file per step and partition. A global step runs as one Ray task; the fan-out
it asks for (``stage.fan_out``) becomes one Ray task per call.

Ray's own logs (its workers' output, Ray Data's execution logs) go to files under the session
folder; ``save_logs`` copies them to ``OUTPUT/logs/`` at the end of a run. ``verbose`` brings
them back to the terminal, with Ray Data's own progress bars.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from datakit.engine import steps as run_steps
from datakit.engine.plan import Step
from datakit.stage import Stage
from datakit.store import Location, WorkDir
from portrait.stopping import stop_on_sigterm


class RayExecutor:
    name = "ray"

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    @contextmanager
    def session(self, address: str | None, num_cpus: int | None, log_dir: Path):
        """Ray up for the length of a build. Unless verbose, what Ray's native code and the
        processes it starts write to this process's stderr goes to ``log_dir/driver.log``
        instead of the terminal, and the session's log files are copied to ``log_dir`` at the end."""
        log_dir.mkdir(parents=True, exist_ok=True)
        with native_stderr_to(None if self.verbose else log_dir / "driver.log"):
            self.start(address, num_cpus)
            try:
                yield
            finally:
                self.save_logs(log_dir)

    def start(self, address: str | None, num_cpus: int | None) -> None:
        import ray

        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = dict(
            include_dashboard=False,
            logging_level=logging.INFO if self.verbose else logging.ERROR,
            log_to_driver=self.verbose,
        )
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
        stop_on_sigterm()  # ray.init made SIGTERM a silent sys.exit(15)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = self.verbose
        ctx.enable_operator_progress_bars = self.verbose
        ctx.print_on_execution_start = False
        if not self.verbose:
            logging.getLogger("ray").setLevel(logging.ERROR)
            logging.getLogger("ray.data").setLevel(logging.ERROR)

    def save_logs(self, log_dir: Path) -> None:
        """Copy this Ray session's log files (a local cluster's: workers, raylet, Ray Data) to
        ``log_dir``; a remote cluster keeps its logs on its own nodes."""
        import shutil

        import ray

        node = getattr(ray._private.worker, "_global_node", None)
        logs = Path(node.get_logs_dir_path()) if node is not None else None
        if logs is None or not logs.is_dir():
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        for path in logs.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt"):
                dest = log_dir / path.relative_to(logs)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)

    def cluster_cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1.0))

    def run_partitions(self, work: WorkDir, segment: list[Step], upstream: list[str], context: dict,
                       pending: list[int]) -> None:
        """One Ray Data pipeline over the pending partitions: an actor pool per step."""
        import ray

        ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
        cpus = self.cluster_cpus()
        for i, step in enumerate(segment):
            settings = step.settings
            # A class named after the step, so Ray's own logs read "MapBatches(detect)".
            worker = type(step.name, (PartitionWorker,), {})
            pool = settings.concurrency or max(1, int(cpus if step.cls.uses_model else cpus * 2))
            ds = ds.map_batches(
                worker,
                batch_size=1,
                fn_constructor_kwargs=dict(
                    stage_cls=step.cls, settings=settings, context=context,
                    upstream=upstream + [s.name for s in segment[:i]], output=work.output,
                ),  # fmt: skip
                num_cpus=settings.num_cpus,
                num_gpus=settings.num_gpus or None,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
            )
        for _ in ds.iter_batches(batch_size=None):
            pass

    def run_global(self, work: WorkDir, step: Step, upstream: list[str], context: dict) -> None:
        import ray

        task = ray.remote(_global_task).options(num_cpus=step.settings.num_cpus, num_gpus=step.settings.num_gpus or None)
        ray.get(task.remote(step, context, upstream, work.output))


@contextmanager
def native_stderr_to(path: Path | None):
    """Point file descriptor 2 at ``path`` (Ray's C++ logs and child processes write there);
    Python's ``sys.stderr`` and the logging handlers on it keep the terminal."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    before = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(before, "encoding", None) or "utf-8")
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler) and h.stream is before]
    sys.stderr = terminal
    for h in handlers:
        h.setStream(terminal)
    try:
        yield
    finally:
        terminal.flush()
        for h in handlers:
            h.setStream(before)
        sys.stderr = before
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


class PartitionWorker:
    """One Ray Data worker of a partition step: builds the stage once, then runs partitions."""

    def __init__(self, stage_cls: type[Stage], settings, context: dict, upstream: list[str], output: Location):
        self.stage: Stage = stage_cls(settings, context)
        self.stage.setup()
        self.work = WorkDir(output)
        self.upstream = upstream

    def __call__(self, batch: dict) -> dict:
        for part in batch["part"]:
            run_steps.run_partition(self.stage, self.work, int(part), self.upstream)
        return batch


def _global_task(step: Step, context: dict, upstream: list[str], output: Location) -> None:
    stage = step.build(context)
    stage.setup()
    stage.fan_out = functools.partial(ray_map, num_cpus=step.settings.num_cpus)
    run_steps.run_global(stage, WorkDir(output), upstream)


def ray_map(fn, arg_list: list[tuple], num_cpus: float) -> list:
    """fn(*args) for each args as Ray tasks; results in order."""
    import ray

    remote = ray.remote(fn).options(num_cpus=num_cpus)
    return ray.get([remote.remote(*args) for args in arg_list])

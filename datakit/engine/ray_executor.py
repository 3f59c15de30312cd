"""Run a plan on Ray: the only module that imports Ray.

A segment of partition steps runs on Ray actors: a pool per group of steps (``plan.pools``:
consecutive CPU steps share one unless the recipe says ``ray.fuse_steps: false``; a model is
loaded once per actor), and the driver hands each partition number to the next free actor of
the next group (``schedule``), blocking in ``ray.wait`` in between. The data itself moves
through the work folder, one atomic file per step and partition, so neither the grouping nor the
order in which actors take partitions changes what is built. (Ray Data's streaming executor did
this before; it kept three helper actors and a polling driver busy for nothing the work folder
did not already give.) A global step runs as one Ray task; the fan-out
it asks for (``stage.fan_out``) becomes one Ray task per call.

Ray's own logs (its workers' output) go to files under the session folder; ``save_logs`` copies
them to ``OUTPUT/logs/`` at the end of a run. ``verbose`` brings them back to the terminal.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path

from datakit.engine import steps as run_steps
from datakit.engine.plan import Step, pools
from datakit.stage import Stage
from datakit.store import Location, WorkDir
from portrait.stopping import stop_on_sigterm

log = logging.getLogger("datakit")


class RayExecutor:
    name = "ray"

    def __init__(self, verbose: bool = False, fuse: bool = True):
        self.verbose = verbose
        self.fuse = fuse  # consecutive CPU steps share a pool (plan.pools)
        self.started = False  # this session started (or connected) Ray, so it stops it

    @contextmanager
    def session(self, address: str | None, num_cpus: int | None, log_dir: Path):
        """Ray up for the length of a build. Unless verbose, what Ray's native code and the
        processes it starts write to this process's stderr goes to ``log_dir/driver.log``
        instead of the terminal, and the session's log files are copied to ``log_dir`` at the end.
        A Ray this session started is shut down here, not at interpreter exit, where Ray's own
        hook waits another half second (~0.8 s from the build's end to exit, measured)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        with native_stderr_to(None if self.verbose else log_dir / "driver.log"):
            self.start(address, num_cpus)
            try:
                yield
            finally:
                self.save_logs(log_dir)
                self.stop()

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
        self.started = True
        stop_on_sigterm()  # ray.init made SIGTERM a silent sys.exit(15)
        if not self.verbose:
            logging.getLogger("ray").setLevel(logging.ERROR)

    def stop(self) -> None:
        """Shut down (or disconnect from) the Ray this session started; one it found running stays."""
        import ray

        if self.started:
            kill_autoscaler_monitor()
            ray.shutdown()
            self.started = False

    def save_logs(self, log_dir: Path) -> None:
        """Copy this Ray session's log files (a local cluster's: workers, raylet) to
        ``log_dir``; a remote cluster keeps its logs on its own nodes."""
        import shutil

        node = ray_node()
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
        """Every pending partition through the segment's steps: an actor pool per group of steps
        (``plan.pools``), a partition handed to the next group's pool when the group before it
        is done with it."""
        cpus = self.cluster_cpus()
        lanes, done = [], list(upstream)
        for group in pools(segment, self.fuse):
            lanes.append(Lane(group, done, context, work.output, cpus))
            done = done + [s.name for s in group]
        schedule(lanes, pending)

    def run_global(self, work: WorkDir, step: Step, upstream: list[str], context: dict) -> None:
        import ray

        task = ray.remote(_global_task).options(num_cpus=step.settings.num_cpus, num_gpus=step.settings.num_gpus or None)
        ray.get(task.remote(step, context, upstream, work.output))


def ray_node():
    """This process's Ray node (Ray's private handle: its log folder and, for a Ray this process
    started, its processes), or None before ``ray.init``."""
    import ray

    return getattr(ray._private.worker, "_global_node", None)


def kill_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the local Ray this process started. ``ray.shutdown`` sends
    each of Ray's processes SIGTERM and waits up to a second for it; the monitor sleeps between
    its updates and never exits in time, so every build waited that second before Ray sent
    SIGKILL (measured: shutdown 1.4 s, 0.45 s with the monitor killed first). A local cluster's
    monitor holds no state. Connected to a cluster, this process started no monitor."""
    from ray._private import ray_constants

    node = ray_node()
    monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
    for info in monitors:
        info.process.kill()
        info.process.wait()


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
    """One actor of a group of partition steps: builds their stages once (each model loaded
    once per actor), then runs each partition it is given through them in order."""

    def __init__(self, steps: list[tuple[type[Stage], object]], context: dict, upstream: list[str], output: Location):
        self.stages: list[Stage] = [cls(settings, context) for cls, settings in steps]
        for stage in self.stages:
            stage.setup()
        self.work = WorkDir(output)
        self.upstream = upstream

    def run(self, part: int) -> int:
        done, held = list(self.upstream), {}  # each step's table, for the steps after it (no read back)
        for stage in self.stages:
            run_steps.run_partition(stage, self.work, part, done, held)
            done.append(stage.name)
        return part


RETRIES = 3  # a partition whose actor was lost (its node died, its process crashed) goes to a new actor this often


class Lane:
    """The actor pool of one group of steps: up to ``size`` actors, started when there is a
    partition for them and room in the cluster, stopped when the group is done."""

    def __init__(self, group: list[Step], upstream: list[str], context: dict, output: Location, cpus: float):
        first = group[0].settings
        uses_model = any(s.cls.uses_model for s in group)
        self.size = first.concurrency or max(1, int(cpus if uses_model else cpus * 2))
        self.resources = {"CPU": max(s.settings.num_cpus for s in group), "GPU": first.num_gpus}
        # A class named after the steps, so Ray's process titles and logs read "download+detect".
        self.cls = type("+".join(s.name for s in group), (PartitionWorker,), {})
        self.args = ([(s.cls, s.settings) for s in group], context, upstream, output)
        self.actors: list = []
        self.idle: list = []

    def free_actor(self):
        """An idle actor, a new one if the pool may grow and the cluster has room (a pool always
        gets its first), or None."""
        if self.idle:
            return self.idle.pop()
        if len(self.actors) >= self.size or (self.actors and not self._room()):
            return None
        import ray

        actor = ray.remote(self.cls).options(
            num_cpus=self.resources["CPU"], num_gpus=self.resources["GPU"] or None, scheduling_strategy="SPREAD",
        ).remote(*self.args)  # fmt: skip
        self.actors.append(actor)
        return actor

    def _room(self) -> bool:
        import ray

        free = ray.available_resources()
        return all(free.get(k, 0.0) >= v for k, v in self.resources.items() if v)

    def retire(self, actor) -> None:
        """Stop using an actor that was lost; the next ``free_actor`` starts a new one."""
        import ray

        if actor in self.actors:
            self.actors.remove(actor)
        ray.kill(actor)

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle = [], []


def schedule(lanes: list[Lane], pending: list[int]) -> None:
    """Move each partition through the lanes in order, as many at once as the lanes have actors.
    The driver blocks in ``ray.wait`` between answers; a lane's actors stop as soon as no
    partition can reach it any more, which frees their resources for the lanes after it. A
    partition whose actor is lost is given to another actor (steps it finished are not redone:
    each is one atomic file); a stage's own error stops the build."""
    import ray

    queues = [deque(pending)] + [deque() for _ in lanes[1:]]
    running: dict = {}  # reference -> (lane index, actor, partition)
    lost: Counter = Counter()
    try:
        while running or any(queues):
            for i in reversed(range(len(lanes))):  # later lanes first: finish partitions before starting more
                while queues[i] and (actor := lanes[i].free_actor()) is not None:
                    part = queues[i].popleft()
                    running[actor.run.remote(part)] = (i, actor, part)
            ready, _ = ray.wait(list(running), num_returns=1)
            i, actor, part = running.pop(ready[0])
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as error:
                lost[part] += 1
                if lost[part] > RETRIES:
                    raise
                log.warning("partition %d: its worker was lost (%s); giving it to another", part, type(error).__name__)
                lanes[i].retire(actor)
                queues[i].appendleft(part)
                continue
            lanes[i].idle.append(actor)
            if i + 1 < len(lanes):
                queues[i + 1].append(part)
            for j, lane in enumerate(lanes):
                upstream_busy = any(queues[k] or any(r[0] == k for r in running.values()) for k in range(j + 1))
                if lane.actors and not upstream_busy:
                    lane.stop()
    finally:
        for lane in lanes:
            lane.stop()


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

"""Running ``datakit run`` against the cluster, cleanly or while faults are injected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from datakit.store import ITEMS, WorkDir, read_table
from devtools.rehearsal.servers import ALL_STAGES, FixedPortServer, PYTHON, REPO
from devtools.rehearsal.cluster import MemorySampler, RayCluster


# ---------------------------------------------------------------- running datakit


def start_driver(recipe: Path, output: Path, cluster: "RayCluster", log: Path, flaky: bool = False) -> subprocess.Popen:
    """``datakit run`` into ``output``; ``flaky``: through devtools.flakyfs, which fails one write
    while the recipe's ``storage_options.fail_flag`` file exists."""
    env, address = cluster.env, cluster.address
    target = f"flaky://{output}" if flaky else str(output)
    f = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen([PYTHON, "-m", "datakit", "run", str(recipe), "--output", target, "--address",
                             address, "--quiet"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def total_parts(output: Path) -> int | None:
    work = WorkDir(output)
    return work.num_parts() if work.is_done(ITEMS) else None


def progress(output: Path) -> int:
    """Files finished so far, all stages together (grows while the run moves)."""
    return len(list((output / "_work").glob("*/stats-*.json"))) if (output / "_work").exists() else 0


STALLED = -1000  # wait_driver's code for a run it killed after no progress for stall_s


def wait_driver(proc: subprocess.Popen, output: Path, stall_s: float, until=None) -> int | None:
    """Wait for the driver to exit (returns its code), or for ``until()`` to hold (returns None).

    A run that makes no progress for ``stall_s`` seconds is killed, as an operator would: after
    a node is lost, a call can keep waiting on an actor that never comes back."""
    last, last_change = progress(output), time.time()
    while True:
        code = proc.poll()
        if code is not None:
            return code
        if until is not None and until():
            return None
        now = progress(output)
        if now != last:
            last, last_change = now, time.time()
        elif time.time() - last_change > stall_s:
            kill_driver(proc)
            return STALLED
        time.sleep(0.2)


def kill_driver(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started locally
    except ProcessLookupError:
        pass
    proc.wait(30)


@dataclass
class FaultLog:
    events: list[str] = field(default_factory=list)
    attempts: int = 0

    def note(self, text: str) -> None:
        self.events.append(text)
        print(f"  fault: {text}", flush=True)


def source_downloading(output: Path) -> int:
    """Index of the source (= server) whose items the first undownloaded partition holds."""
    work = WorkDir(output)
    done = work.done_parts("download")
    for part in range(total_parts(output) or 0):
        if part not in done:
            source = read_table(work.part_path(ITEMS, part), columns=["source"])
            return int(source.column("source")[0].as_py().split("_")[-1])
    return 0


def first_partition_stage(output: Path, stages: list[str], fraction: float):
    """A predicate: some partition stage has at least ``fraction`` of its partitions done."""
    def check() -> bool:
        n = total_parts(output)
        return bool(n) and any(len(WorkDir(output).done_parts(s)) >= max(1, int(n * fraction)) for s in stages)
    return check


def run_clean(recipe: Path, output: Path, cluster: RayCluster, log: Path, stall_s: float = 300) -> dict:
    t0 = time.time()
    with MemorySampler(cluster) as mem:
        proc = start_driver(recipe, output, cluster, log)
        try:
            code = wait_driver(proc, output, stall_s)
        finally:
            if proc.poll() is None:
                kill_driver(proc)
    if code != 0:
        raise RuntimeError(f"the clean run failed (exit {code}); see {log}")
    return {"wall_s": time.time() - t0, "peak_rss": mem.peak}


def run_with_faults(recipe: Path, output: Path, cluster: RayCluster, servers: list[FixedPortServer],
                    fail_flag: Path, log: Path, outage_s: float = 2.0, stall_s: float = 300,
                    max_attempts: int = 8) -> FaultLog:
    """One build with every fault kind injected; started again after each lost driver until done."""
    faults = FaultLog()
    drivers: list[subprocess.Popen] = []
    try:
        return _run_with_faults(recipe, output, cluster, servers, fail_flag, log, outage_s, stall_s, max_attempts,
                                faults, drivers)
    finally:
        for proc in drivers:
            if proc.poll() is None:
                kill_driver(proc)


def _run_with_faults(recipe, output, cluster, servers, fail_flag, log, outage_s, stall_s, max_attempts, faults,
                     drivers) -> FaultLog:
    download = ["download"]
    t0 = time.time()
    # 1. one source's server stops for a while during download, the worker node dies mid-stage
    proc = start_driver(recipe, output, cluster, log, flaky=True)
    drivers.append(proc)
    faults.attempts += 1
    if wait_driver(proc, output, stall_s, until=first_partition_stage(output, download, 0.01)) is None:
        server = servers[source_downloading(output)]
        server.stop()
        down = time.time()
        faults.note(f"HTTP server :{server.port} stopped at {down - t0:.1f} s")
        time.sleep(outage_s)
        server.start()
        faults.note(f"HTTP server :{server.port} back after {time.time() - down:.1f} s (restart included)")
    if wait_driver(proc, output, stall_s, until=first_partition_stage(output, download, 0.3)) is None:
        killed = cluster.restart_worker()
        faults.note(f"worker node killed ({killed} processes) at {time.time() - t0:.1f} s and started again")
    # 2. the driver dies by SIGKILL once more work is done
    late = [s for s in ALL_STAGES if s != "download"] + download
    code = wait_driver(proc, output, stall_s, until=first_partition_stage(output, late, 0.6))
    if code is None:
        kill_driver(proc)
        faults.note(f"driver SIGKILLed at {time.time() - t0:.1f} s")
    elif code == STALLED:
        faults.note(f"driver SIGKILLed by the watchdog at {time.time() - t0:.1f} s: run 1 made no progress "
                    f"for {stall_s:g} s after the node loss")
    else:
        faults.note(f"driver exited (code {code}) before the SIGKILL point")
    # 3. the next run hits one failing write, then runs are started until one completes
    fail_flag.write_text("fail the next parquet write\n")
    faults.note("next parquet write set to fail once")
    while faults.attempts < max_attempts:
        cluster.wait_for_nodes(2)
        proc = start_driver(recipe, output, cluster, log, flaky=True)
        drivers.append(proc)
        faults.attempts += 1
        code = wait_driver(proc, output, stall_s)
        if code == 0:
            break
        why = f"made no progress for {stall_s:g} s and was killed" if code == STALLED else f"ended with exit code {code}"
        faults.note(f"run {faults.attempts} {why}; starting it again")
    else:
        raise RuntimeError(f"the faulty build did not complete in {max_attempts} runs; see {log}")
    if fail_flag.exists():
        raise RuntimeError("the injected write failure never fired (devtools.flakyfs did not reach the workers)")
    runs = json.loads((output / "build.json").read_text()).get("runs", [])
    restarts = sum(r.get("stall_restarts", 0) for r in runs)
    faults.note(f"build complete after {faults.attempts} runs, {time.time() - t0:.1f} s; "
                f"datakit's stall watch restarted a stage {restarts} times in the run that finished")
    return faults

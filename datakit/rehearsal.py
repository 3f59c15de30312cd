"""Scale and fault rehearsal on a real two-node Ray cluster on this machine.

``python -m datakit.rehearsal`` (``make rehearsal``) starts a Ray head and a second Ray node
(``ray start --head`` / ``ray start --address``, one CPU each, separate temp folders and ports),
serves fixture photos under distinct URLs (plus a share of the downloader's fault routes) from
two local HTTP server processes, and runs ``datakit run --address`` against that cluster:

1. a clean run, sampling the resident memory of every process of the cluster;
2. the same recipe again into a second folder while faults are injected: the HTTP server of
   one source is stopped for a while and started again on the same port; the worker node is
   killed (its raylet and every process under it) mid-stage and started again; the driver is
   killed with SIGKILL and the run started again; one parquet write fails (the
   ``DATAKIT_FAIL_WRITE_FLAG`` hook of ``datakit.store``): the runner retries the write, and
   a run that fails anyway is started again. A stage that makes no progress for the recipe's
   ``ray.stall_timeout`` (60 s here; Ray Data can wait forever on an actor of a lost node)
   is restarted by datakit's own watchdog (``datakit.watchdog``); the rehearsal kills a
   driver that makes no progress for ``stall_s`` (300 s) only as a backstop;
3. the two builds are compared: every manifest (``*.parquet`` of the output folder) has the
   same rows and values, every tar shard has the same sha256, and ``datakit verify`` passes.

What "identical" means here: every column of every manifest is equal except
``images.parquet:attempts``, which records how many requests this build made for an item.
A partition that is downloaded again after a kill, or an item that was retried while its
server was down, honestly needs a different number of requests; the rehearsal reports how
many rows differ in ``attempts`` and checks that each of them has the same outcome. The
server outage is shorter than the download retry window (``retries`` with doubling
``backoff_s``), so the affected items are fetched on a retry. An outage longer than that
window ends those items as ``connection_error`` rows, which a resume does not fetch again:
the build would complete and account for every item, but it would not equal the clean one.

The rehearsal also prints peak memory at two sizes, the object store's spilled bytes, the
measured per-item cost of each stage and a projection to 960k images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from datakit.store import ITEMS, WorkDir, read_table
from datakit.testing.httpserver import PhotoServer

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
HOST = "127.0.0.1"
ALL_STAGES = ["download", "detect", "filter", "embed", "attributes", "dedup", "cluster", "caption", "shard"]
# One of each fault kind of the downloader tests; {k} makes keyed routes distinct per item.
FAULT_ROUTES = [
    "fault/status/404?copy={k}",
    "fault/status/500?copy={k}",
    "fault/flaky/{k}?fail=1",
    "fault/retry-after/{k}?seconds=1&times=1",
    "fault/slow-headers?delay=60&copy={k}",
    "fault/cut-body?copy={k}",
    "fault/truncated.jpg?copy={k}",
    "fault/html-as-jpeg?copy={k}",
    "fault/huge.png?copy={k}",
    "fault/redirect-loop/{k}",
    "fault/redirect-chain/2?copy={k}",
    "fault/noai?tag=noai&copy={k}",
    "fault/big?size=200000000&copy={k}",
]


def photo_folders() -> list[Path]:
    """The two photo folders served (one per server); the faces fixture if present."""
    demo = REPO / "data" / "demo" / "folder"
    dev = REPO.parent / "shared" / "fixtures" / "faces" / "dev"
    return [demo, dev if dev.is_dir() else demo]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- HTTP servers on fixed ports


class FixedPortServer:
    """A photo server process on a port that stays the same across stop() and start()."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.server: PhotoServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def start(self) -> None:
        self.server = PhotoServer(self.folder, in_process=False, port=self.port)
        self.server.__enter__()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# ---------------------------------------------------------------- the Ray cluster


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    args: list[str]
    marker: str = ""  # a string only this node's processes carry on their command line

    def processes(self):
        """This node's processes: those naming its node-manager port or temp folder, and their children."""
        import psutil

        roots = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.marker in cmd + " " or str(self.temp_dir) in cmd:
                roots.append(p)
        seen = {p.pid: p for p in roots}
        for p in roots:
            try:
                for c in p.children(recursive=True):
                    seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass
        return [p for p in seen.values() if p.pid != os.getpid()]

    def kill(self) -> int:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
        return len(procs)


class RayCluster:
    """A head and one more node on this machine, each with its own CPU share, ports and temp folder."""

    def __init__(self, root: Path, cpus: tuple[int, int] = (1, 1), object_store_mb: int = 200, env: dict | None = None):
        self.root = Path(root)
        self.gcs_port = free_port()
        self.address = f"{HOST}:{self.gcs_port}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray's token authentication, with a token of this cluster only (not ~/.ray/auth_token)
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        store = str(object_store_mb * 2**20)
        self.head = self._node("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(cpus[0]),
                                        "--object-store-memory", store, "--include-dashboard", "false",
                                        "--ray-client-server-port", str(free_port())])
        self.head.marker = f":{self.gcs_port} "  # also the head's client server, which names only the GCS
        self.worker = self._node("worker", ["--address", self.address, "--num-cpus", str(cpus[1]),
                                            "--object-store-memory", store])

    def _node(self, name: str, args: list[str]) -> RayNode:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        nm_port = free_port()
        # worker ports: below the ephemeral range that free_port() draws from, and above Ray's fixed
        # defaults (client server 10001, which a range starting at 10000 collided with: 1 run in 80)
        base = 10250 + 250 * secrets.randbelow(80)
        ports = ["--node-manager-port", str(nm_port), "--object-manager-port", str(free_port()),
                 "--min-worker-port", str(base), "--max-worker-port", str(base + 200),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        spill = temp / "spill"
        return RayNode(name, temp, args + ports + ["--node-ip-address", HOST, "--temp-dir", str(temp), "--object-spilling-directory", str(spill),
                                                   "--disable-usage-stats"],
                       marker=f"--node_manager_port={nm_port}")

    def start_node(self, node: RayNode) -> None:
        out = subprocess.run([RAY, "start", *node.args], env=self.env, cwd=self.root, capture_output=True, text=True,
                             timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start ({node.name}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

    def start(self) -> None:
        self.start_node(self.head)
        self.start_node(self.worker)
        self.wait_for_nodes(2)

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster at {self.address} has not {n} live nodes after {timeout:g} s")

    def alive_nodes(self) -> int:
        out = subprocess.run([PYTHON, "-c", _COUNT_NODES, self.address], env=self.env, capture_output=True,
                             text=True, timeout=120)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def restart_worker(self) -> int:
        killed = self.worker.kill()
        time.sleep(2.0)
        self.start_node(self.worker)
        return killed

    def processes(self):
        return list({p.pid: p for p in self.head.processes() + self.worker.processes()}.values())

    def stop(self) -> None:
        """Kill both nodes' processes (by id, found from their own ports and folders); never `ray stop`,
        which would also stop other Ray clusters on the machine."""
        for node in (self.worker, self.head):
            for _ in range(3):  # a dying raylet can still start a child: sweep until none is left
                if node.kill() == 0:
                    break

    def spilled_bytes(self) -> tuple[int | None, str]:
        out = subprocess.run([RAY, "memory", "--stats-only", "--address", self.address], env=self.env,
                             capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        m = re.search(r"Spilled\s+([\d.]+)\s*MiB", text)
        if m:
            return int(float(m.group(1)) * 2**20), text
        return (0 if "Spilled" not in text and out.returncode == 0 else None), text


_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)
print(sum(1 for n in ray.nodes() if n['Alive']))
"""


@contextmanager
def ray_cluster(**kwargs):
    """A started two-node cluster in a short temp folder (Ray's socket paths must stay under
    107 bytes), stopped and removed at the end whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="dkr-", dir="/tmp"))
    cluster = RayCluster(root, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


class MemorySampler:
    """Peak of the summed resident memory of the cluster's processes, sampled in a thread."""

    def __init__(self, cluster: RayCluster, interval: float = 0.5):
        self.cluster, self.interval = cluster, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in self.cluster.processes():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------- corpus and recipe


def write_url_list(path: Path, folder: Path, n: int, fault_every: int, start: int) -> None:
    """``n`` URL rows: photos of ``folder`` repeated under distinct URLs, every ``fault_every``-th a fault route."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .jpg photos to serve")
    lines = ["url,name"]
    for i in range(n):
        k = start + i
        if fault_every and i % fault_every == fault_every - 1:
            route = FAULT_ROUTES[(i // fault_every) % len(FAULT_ROUTES)].format(k=k)
            lines.append(f"{route},")
        else:
            rel = files[i % len(files)]
            name = rel.split("/")[0].replace("_", " ") if "/" in rel else ""
            lines.append(f"files/{quote(rel)}?copy={k},{name}")
    path.write_text("\n".join(lines) + "\n")


def write_recipe(folder: Path, servers: list[FixedPortServer], items: int, stages: list[str],
                 partition_size: int, fault_every: int = 100) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    per_source = [items // len(servers) + (1 if i < items % len(servers) else 0) for i in range(len(servers))]
    start = 0
    for i, (server, n) in enumerate(zip(servers, per_source)):
        csv = folder / f"urls_{i}.csv"
        write_url_list(csv, server.folder, n, fault_every, start)
        start += n
        sources.append({"name": f"web_{i}", "kind": "urls", "path": csv.name, "url_column": "url",
                        "name_column": "name", "base_url": server.base_url,
                        "license": "fixture photos: research use", "intended_use": "research only"})
    settings = {
        # retries x doubling backoff (1+2+4+8+16 s, jittered) outlasts the injected outage, which
        # includes the server's restart (seconds on a busy machine: a 7.5 s window was too short)
        "download": {"timeout_s": 5, "retries": 5, "backoff_s": 1.0, "allow_private_addresses": True,
                     "request_concurrency": 32, "per_host_concurrency": 16, "max_bytes": 20_000_000},
        "detect": {}, "filter": {"min_area_fraction": 0.10}, "embed": {}, "attributes": {}, "dedup": {},
        "cluster": {"min_images": 5}, "caption": {"mode": "template"},
        "shard": {"image_size": 256, "max_samples": 200, "min_shards": 2},
    }
    recipe = {
        "name": "rehearsal",
        "output": "out",
        "sources": sources,
        "ray": {"partition_size": partition_size, "stall_timeout": 60},
        "stages": {name: settings[name] for name in stages},
    }
    if any(s in stages for s in ("detect", "embed")):
        recipe["faces"] = {"backend": "dlib"}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------- running datakit


def start_driver(recipe: Path, output: Path, cluster: "RayCluster", log: Path) -> subprocess.Popen:
    env, address = cluster.env, cluster.address
    f = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen([PYTHON, "-m", "datakit", "run", str(recipe), "--output", str(output), "--address",
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
    a node is lost, Ray Data can keep retrying a task on an actor that never comes back."""
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
    proc = start_driver(recipe, output, cluster, log)
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
        proc = start_driver(recipe, output, cluster, log)
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
        raise RuntimeError("the injected write failure never fired (DATAKIT_FAIL_WRITE_FLAG did not reach the workers)")
    runs = json.loads((output / "build.json").read_text()).get("runs", [])
    restarts = sum(r.get("stall_restarts", 0) for r in runs)
    faults.note(f"build complete after {faults.attempts} runs, {time.time() - t0:.1f} s; "
                f"datakit's stall watch restarted a stage {restarts} times in the run that finished")
    return faults


# ---------------------------------------------------------------- comparing builds


def manifest_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("*.parquet"))


def shard_hashes(output: Path) -> dict[str, str]:
    out = {}
    for p in sorted((output / "shards").rglob("*.tar")) if (output / "shards").exists() else []:
        out[p.relative_to(output).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def compare_builds(clean: Path, faulty: Path) -> dict:
    """Differences between two builds' manifests and shards; ``attempts`` is reported apart."""
    import pyarrow.parquet as pq

    problems: list[str] = []
    attempts_differ = 0
    if manifest_files(clean) != manifest_files(faulty):
        problems.append(f"manifest files differ: {manifest_files(clean)} vs {manifest_files(faulty)}")
    for name in manifest_files(clean):
        if not (faulty / name).exists():
            continue
        a, b = pq.read_table(clean / name), pq.read_table(faulty / name)
        if a.schema != b.schema:
            problems.append(f"{name}: schemas differ")
            continue
        if a.num_rows != b.num_rows:
            problems.append(f"{name}: {a.num_rows} rows vs {b.num_rows}")
            continue
        key = [c for c in ("image_id", "identity_id", "shard", "key") if c in a.column_names][:1]
        if key:
            a, b = a.sort_by([(key[0], "ascending")]), b.sort_by([(key[0], "ascending")])
        for col in a.column_names:
            if name == "images.parquet" and col == "attempts":
                x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
                attempts_differ = sum(1 for u, v in zip(x, y) if u != v)
                continue
            if not a.column(col).equals(b.column(col)):
                x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
                bad = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
                problems.append(f"{name}:{col}: {len(bad)} rows differ, e.g. row {bad[0]}: {x[bad[0]]!r} vs {y[bad[0]]!r}")
    ha, hb = shard_hashes(clean), shard_hashes(faulty)
    if ha != hb:
        problems.append(f"shard tars differ: {sorted(set(ha.items()) ^ set(hb.items()))[:4]}")
    return {"problems": problems, "attempts_differ": attempts_differ, "tars": len(ha),
            "manifests": manifest_files(clean)}


def verify(output: Path) -> tuple[int, str]:
    out = subprocess.run([PYTHON, "-m", "datakit", "verify", str(output)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    return out.returncode, out.stdout[-3000:] + out.stderr[-3000:]


# ---------------------------------------------------------------- cost and projection


FACE_STAGES = ("detect", "embed")
# Global stages that fan out one Ray task per partition or shard (dedup's phash, shard's encode):
# their build.json seconds are the wall time of the whole stage on the measuring cluster.
FANNED_OUT = ("dedup", "shard")


def stage_costs(output: Path) -> dict[str, dict]:
    """Seconds per item each stage spent (from build.json), and the share of the input it sees."""
    build = json.loads((output / "build.json").read_text())
    items = build["counts"]["items"]
    out = {}
    for name in [n for n in ALL_STAGES if n in build["stages"]]:
        s = build["stages"][name]
        survival = s["items_in"] / max(1, items)
        if "dedup" in out and name in ("cluster", "caption", "shard"):
            # The rehearsal repeats a few hundred photos, so dedup drops almost everything; a real
            # corpus has few duplicates: project later stages with dedup's input share instead.
            survival = out["dedup"]["survival"]
        out[name] = {"s_per_item": s["seconds"] / max(1, s["items_in"]), "survival": survival,
                     "seconds": s["seconds"], "items_in": s["items_in"]}
    return out


# The paper's models on GPUs. Nothing here has a GPU, so the GPU case rests on published figures,
# per image (detector) and per face (recognition), named with their sources in the output.
GPU_MS = {
    "detect": (4.9, "SCRFD-10GF: 4.9 ms per VGA image on a GPU, batch 1 (insightface detection/scrfd/README.md; "
                    "arXiv:2105.04714)"),
    "embed": (1000 * 16 / (3 * 5200), "ArcFace r100: ~5,200 training samples/s on 16 GPUs (insightface "
              "recognition/arcface_torch/README.md, WF42M-PFC-0.2 r100(256*16)); a training step costs ~3 forward "
              "passes, so ~975 faces/s forward per GPU"),
}
PAPER_MODELS = {"detect": ("scrfd_10g_kps", "dlib HOG detector"), "embed": ("arcface_r100", "dlib ResNet (128-d)")}


def paper_model_costs(path: Path = REPO / "bench-out" / "model_costs.json") -> dict[str, dict]:
    """CPU ms per unit (batch 1, one thread) of the paper's models and of the dlib models they
    replace, per face stage: from `make bench-faces` (its model section), else measured now."""
    if path.exists():
        measured = json.loads(path.read_text())
    else:
        from devtools import face_model_zoo as zoo

        with tempfile.TemporaryDirectory() as tmp:
            measured = {"dlib": [], "paper": [zoo.measure(n, Path(tmp), batches=(1,), min_seconds=1.0)
                                              for n, _ in PAPER_MODELS.values()]}
    by_name = {m.get("name", m["label"]): m for m in measured["paper"] + measured["dlib"]}
    return {stage: {"label": by_name[paper]["label"], "cpu_ms": by_name[paper]["runs"][0]["cpu_ms"],
                    "dlib_ms": by_name[dlib]["runs"][0]["cpu_ms"] if dlib in by_name else None}
            for stage, (paper, dlib) in PAPER_MODELS.items()}


def projection(costs: dict[str, dict], measured_cpus: int = 2, images: int = 960_000, nodes: int = 8,
               cpus: int = 32, gpus_per_node: int = 1, efficiency: float = 0.7,
               paper: dict[str, dict] | None = None) -> list[str]:
    """Wall time for ``images`` on ``nodes`` x ``cpus`` from measured per-item costs.

    Partition stages (seconds = worker time) and the fanned-out global stages (seconds = wall
    on ``measured_cpus``, so x that many core-seconds) spread over every CPU at ``efficiency``.
    ``cluster`` is one task: its time is scaled linearly and added serially. The paper's models
    (``paper``, from `paper_model_costs`) replace dlib's in detect and embed: the stage keeps its
    measured cost minus dlib's model and adds the paper model's measured CPU cost. With GPUs the
    paper's models run at the published GPU figures (``GPU_MS``) while everything else stays on
    the CPUs (pipelined: the slower side sets the pace)."""
    lines = [f"projection to {images:,} images on {nodes} nodes x {cpus} CPUs, {efficiency:.0%} of ideal "
             "parallelism assumed"]
    face = other = serial = 0.0
    rows = []
    for name, c in costs.items():
        core_s = c["s_per_item"] * c["survival"] * images * (measured_cpus if name in FANNED_OUT else 1)
        if name == "cluster":
            serial += core_s
        elif name in FACE_STAGES:
            face += core_s
        else:
            other += core_s
        rows.append((name, core_s, "one task" if name == "cluster" else "parallel"))
    slots = nodes * cpus * efficiency
    gpus = nodes * gpus_per_node * efficiency
    rows.sort(key=lambda r: -r[1])
    whole = sum(r[1] for r in rows) or 1.0
    for name, core_s, how in rows:
        lines.append(f"  {name:<11} {core_s / 3600:9.1f} core-hours  {100 * core_s / whole:5.1f}%  {how}")
    cpu_wall = (face + other) / slots + serial
    lines.append(f"  dlib models, CPU only: {cpu_wall / 3600:6.2f} h wall ({(face + other) / 3600:.0f} core-hours, of which "
                 f"cluster {serial / 3600:.2f} h runs as one task)")
    for target_h in (1.0, 4.0):
        budget = target_h * 3600 - serial
        need = (face + other) / budget / (cpus * efficiency) if budget > 0 else float("inf")
        lines.append(f"  machines of {cpus} CPUs (no GPU) to finish in {target_h:g} h: {need:.1f}")
    drivers = ", ".join(f"{name} {100 * core_s / whole:.0f}%" for name, core_s, _ in rows[:3])
    lines.append(f"  cost drivers (share of core time): {drivers}")
    if paper:
        lines += paper_projection(costs, paper, images, face, other, serial, slots, gpus, gpus_per_node)
    return lines


def paper_projection(costs, paper, images, face, other, serial, slots, gpus, gpus_per_node) -> list[str]:
    """The same build with the paper's models (SCRFD-10G, ArcFace R100), on CPUs and on GPUs."""
    lines = ["  the paper's models (measured here on one CPU thread, random weights, exact architectures):"]
    model_cpu = model_gpu = 0.0  # core-seconds on CPUs / GPU-seconds of the paper's models
    rest = 0.0  # what the face stages do besides their dlib model (decode, alignment, crops)
    for stage in FACE_STAGES:
        if stage not in costs:
            continue
        p, units = paper[stage], costs[stage]["survival"] * images
        gpu_ms, source = GPU_MS[stage]
        model_cpu += units * p["cpu_ms"] / 1000
        model_gpu += units * gpu_ms / 1000
        rest += max(0.0, costs[stage]["s_per_item"] * units - units * (p["dlib_ms"] or 0.0) / 1000)
        lines.append(f"    {stage:<6} {p['label']}: {p['cpu_ms']:.0f} ms CPU (dlib's model {p['dlib_ms'] or 0:.0f} ms); "
                     f"GPU {gpu_ms:.2f} ms, i.e. {p['cpu_ms'] / gpu_ms:.0f}x one core; source: {source}")
    cpu_wall = (rest + model_cpu + other) / slots + serial
    gpu_wall = max((rest + other) / slots, model_gpu / max(gpus, 1e-9)) + serial
    lines.append(f"    CPU only : {cpu_wall / 3600:6.2f} h wall ({(rest + model_cpu + other) / 3600:.0f} core-hours)")
    lines.append(f"    with GPUs: {gpu_wall / 3600:6.2f} h wall ({gpus_per_node} GPU per node: the models "
                 f"{model_gpu / max(gpus, 1e-9) / 3600:.2f} h on GPUs, the rest {(rest + other) / slots / 3600:.2f} h on CPUs)")
    return lines


# ---------------------------------------------------------------- the rehearsal


def rehearse(root: Path, items: int, stages: list[str], partition_size: int, faults: bool = True,
             outage_s: float = 2.0, label: str = "") -> dict:
    """Clean build (+ memory) and, with ``faults``, a faulty build compared with it."""
    root.mkdir(parents=True, exist_ok=True)
    fail_flag = root / "fail-next-write"
    servers = [FixedPortServer(f) for f in photo_folders()]
    result: dict = {"items": items, "stages": stages, "label": label}
    try:
        for s in servers:
            s.start()
        recipe = write_recipe(root / "recipe", servers, items, stages, partition_size)
        with ray_cluster(env={"DATAKIT_FAIL_WRITE_FLAG": str(fail_flag)}) as cluster:
            print(f"[{label}] {items} items, stages {','.join(stages)}, cluster {cluster.address}", flush=True)
            clean = run_clean(recipe, root / "clean", cluster, root / "clean.log")
            spilled, _ = cluster.spilled_bytes()
            result.update(clean_wall_s=clean["wall_s"], peak_rss=clean["peak_rss"], spilled_bytes=spilled)
            print(f"[{label}] clean build: {clean['wall_s']:.1f} s, {items / clean['wall_s']:.1f} items/s "
                  f"({items / clean['wall_s'] / 2:.1f} per node), peak RSS of Ray processes "
                  f"{clean['peak_rss'] / 2**20:.0f} MiB, spilled {_mib(spilled)}", flush=True)
            if faults:
                for s in servers:  # fresh servers (same ports): stateful fault routes start over
                    s.stop()
                    s.start()
                log = run_with_faults(recipe, root / "faulty", cluster, servers, fail_flag, root / "faulty.log",
                                      outage_s=outage_s)
                result.update(fault_events=log.events, fault_runs=log.attempts)
        result["leftover_processes"] = len(cluster.processes())
        result["costs"] = stage_costs(root / "clean")
        if faults:
            result["compare"] = compare_builds(root / "clean", root / "faulty")
            # verify checks a finished build with shards; a build without the shard stage has none
            finished = "shard" in stages
            result["verify"] = verify(root / "faulty")[0] if finished else None
            result["verify_clean"] = verify(root / "clean")[0] if finished else None
    finally:
        for s in servers:
            s.stop()
    (root / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datakit.rehearsal", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="items of the large run")
    parser.add_argument("--small-items", type=int, default=5_000, help="items of the memory comparison run")
    parser.add_argument("--face-items", type=int, default=1_000, help="items of the full-pipeline (face) run")
    parser.add_argument("--partition-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--report-only", action="store_true", help="print the report of an earlier --work folder")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like an exception, so the cluster and the servers are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report_only:
        if args.work is None:
            parser.error("--report-only needs --work")
        small, large, face = (json.loads((args.work / n / "result.json").read_text()) for n in ("small", "large", "faces"))
        return 0 if report(small, large, face) else 1
    work = args.work or Path(tempfile.mkdtemp(prefix="datakit-rehearsal-"))
    t0 = time.time()
    scale = ["download", "dedup"]
    try:
        small = rehearse(work / "small", args.small_items, scale, args.partition_size, faults=False, label="memory")
        large = rehearse(work / "large", args.items, scale, args.partition_size, label="scale")
        face = rehearse(work / "faces", args.face_items, ALL_STAGES, max(16, args.partition_size // 8), label="faces")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = report(small, large, face)
    print(f"rehearsal {'PASSED' if ok else 'FAILED'} in {(time.time() - t0) / 60:.1f} min")
    return 0 if ok else 1


def report(small: dict, large: dict, face: dict) -> bool:
    ok = True
    print("\n== memory (peak RSS summed over every process of both Ray nodes, sampled every 0.5 s)")
    for r in (small, large):
        print(f"  {r['items']:>6} items: {r['peak_rss'] / 2**20:7.0f} MiB   object store spilled: "
              f"{_mib(r['spilled_bytes'])}")
    print(f"  ratio {large['items'] / small['items']:.0f}x items -> {large['peak_rss'] / max(1, small['peak_rss']):.2f}x memory")
    print("\n== throughput (clean builds, 2 nodes x 1 CPU)")
    for r in (small, large, face):
        print(f"  {r['label']:<7} {r['items']:>6} items {','.join(r['stages'])}: {r['clean_wall_s']:.1f} s wall, "
              f"{r['items'] / r['clean_wall_s'] / 2:.1f} items/s per node")
    for r in (large, face):
        c = r["compare"]
        print(f"\n== faults [{r['label']}]: {r['fault_runs']} driver runs; " + "; ".join(r["fault_events"]))
        print(f"  manifests compared: {', '.join(c['manifests'])}; tar shards: {c['tars']}; rows whose "
              f"download attempts differ (same outcome): {c['attempts_differ']}")
        if r["verify"] is None:
            print("  datakit verify: not applicable (no shard stage in this build)")
        else:
            print(f"  datakit verify: clean exit {r['verify_clean']}, faulty exit {r['verify']}")
        for p in c["problems"]:
            print(f"  DIFFERENCE {p}")
        ok = ok and not c["problems"] and r["verify"] in (0, None) and r["verify_clean"] in (0, None)
    costs = dict(face["costs"])
    costs.update({k: v for k, v in large["costs"].items() if k in ("download", "dedup")})
    print("\n== measured per-item worker time (download, dedup from the scale run; the rest from the face run)")
    for name in ALL_STAGES:
        if name in costs:
            c = costs[name]
            print(f"  {name:<11} {1000 * c['s_per_item']:8.2f} ms/item  ({c['items_in']} items in, "
                  f"{100 * c['survival']:.0f}% of the input)")
    print()
    for line in projection(costs, paper=paper_model_costs()):
        print(line)
    return ok


if __name__ == "__main__":
    sys.exit(main())

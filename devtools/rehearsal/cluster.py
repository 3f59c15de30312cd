"""A real two-node Ray cluster on this machine (``ray start --head`` / ``--address``) and its memory."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools.rehearsal.servers import HOST, PYTHON, RAY, free_port


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

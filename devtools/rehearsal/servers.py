"""Photo servers on fixed ports and the corpus and recipe a rehearsal builds."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import quote

from devtools.photoserver import PhotoServer


REPO = Path(__file__).resolve().parent.parent.parent
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
                 partition_size: int, fault_every: int = 100, fail_flag: Path | None = None,
                 stall_timeout: float = 60) -> Path:
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
        "ray": {"partition_size": partition_size, "stall_timeout": stall_timeout},
        "stages": {name: settings[name] for name in stages},
    }
    if fail_flag is not None:  # read by devtools.flakyfs when the output is a flaky:// URL
        recipe["storage_options"] = {"fail_flag": str(fail_flag)}
    if any(s in stages for s in ("detect", "embed")):
        recipe["faces"] = {"backend": "dlib"}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path

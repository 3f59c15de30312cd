"""Download benchmark: `datakit run` against img2dataset, end to end, same server, same URLs.

    make bench-download                      # or: .venv/bin/python benchmarks/bench_download.py
    .venv/bin/python benchmarks/bench_download.py --sizes 3000,20000 --rounds 2

One local server (devtools.photoserver.PhotoServer in its own process) serves the dev
fixture photos (../shared/fixtures/faces/dev: JPEG and PNG, 112 px to 2500 px). Each photo is
listed many times under distinct URLs (``?copy=N``) to make N URLs. For each size (default 3,000
and 20,000 URLs), in the same run, both tools are started as a fresh process and counted the same
way, from process start to the last image written (and, apart, to process exit):

* datakit: ``datakit run`` on a generated recipe with only the download stage, ``full_decode``
  on (every image decoded at full scale, as img2dataset does), 2 partitions in parallel (64
  requests in flight per partition, 16 per host; ``--partition-size`` cuts the list finer, the
  same 2 at a time). Every body is hashed (sha256); each partition
  is written, image bytes included, as parquet. Last image written: the newest download
  partition file. Its start-up is broken down from the files it leaves: items enumerated (the
  items file), first partition written, last partition written, manifests and exit.
* img2dataset (installed into .venv-bench by benchmarks/img2dataset_venv.sh if missing):
  2 processes x 32 threads, webdataset output, ``resize_mode=no`` with ``skip_reencode=True``
  (it decodes each image with OpenCV and writes the original bytes, like us), sha256 hashes.
  Last image written: the newest tar shard.

The work runs at niceness 15 in both: Ray gives it to its workers (the `datakit run` driver and
Ray's daemons run as started), and img2dataset is started at it, so that on a shared machine
both tools' downloading gets the same share of the CPU. Cores used: CPU seconds of the whole process tree (sampled with psutil
every 0.2 s, so Ray's raylet, GCS and workers count for datakit, the pool for img2dataset)
divided by the wall time to exit; the load average is printed beside every timing.
``--stage-only`` adds the old in-process measure (DownloadStage on already-started Ray tasks).
Afterwards datakit's manifest is checked: every row kept, each sha256 equal to the served file's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.photoserver import PhotoServer  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "fixtures" / "faces" / "dev"
BENCH_VENV = REPO / ".venv-bench"

I2D_DRIVER = '''
import json, resource, sys, time
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
if __name__ == "__main__":
    from img2dataset import download
    config = json.loads(sys.argv[1])
    c0, t0 = cpu(), time.perf_counter()
    download(**config)  # its worker pool is joined on return, so its CPU counts as children's
    print("BENCH_RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu() - c0}), flush=True)
'''


# ---------------------------------------------------------------- inputs

def list_photos(folder: Path) -> list[str]:
    photos = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no photos under {folder}; pass --photos DIR")
    return photos


def make_urls(server: PhotoServer, photos: list[str], n: int) -> list[tuple[str, str]]:
    """n distinct URLs, (url, photo path); photo i % len(photos), copy i // len(photos)."""
    return [(server.file_url(photos[i % len(photos)], copy=i // len(photos)), photos[i % len(photos)])
            for i in range(n)]


def items_table(urls: list[tuple[str, str]]) -> pa.Table:
    n = len(urls)
    return pa.table({
        "image_id": [f"{i:08d}" for i in range(n)], "source": ["bench"] * n, "source_kind": ["urls"] * n,
        "locator": [u for u, _ in urls], "label": [None] * n, "extra": [None] * n,
        "fetch_uri": [u for u, _ in urls], "status": ["kept"] * n, "drop_stage": [None] * n,
        "reason": [None] * n, "detail": [None] * n,
    })


# ---------------------------------------------------------------- datakit on Ray

def _download_partition(table: pa.Table, settings: dict, out_path: str) -> dict:
    import resource

    from datakit.engine.steps import decide
    from datakit.stages.download import DownloadStage, Settings
    from datakit.store import atomic_write_table

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this worker
        return usage.ru_utime + usage.ru_stime

    c0 = cpu()
    out = decide(DownloadStage(Settings(**settings), {}), table)
    atomic_write_table(Path(out_path), out)
    status = out.column("status").to_pylist()
    return {"kept": status.count("kept"), "dropped": status.count("dropped"), "cpu": cpu() - c0,
            "niceness": os.nice(0)}


def run_datakit(urls, tasks: int, out_dir: Path, settings: dict) -> dict:
    import ray

    remote = ray.remote(num_cpus=1)(_download_partition)
    table = items_table(urls)
    size = math.ceil(table.num_rows / tasks)
    parts = [table.slice(i * size, size) for i in range(tasks)]
    refs = [ray.put(p) for p in parts]  # the items are in the object store before the clock starts
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = ray.get([remote.remote(ref, settings, str(out_dir / f"part-{i:05d}.parquet"))
                       for i, ref in enumerate(refs)])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ok": sum(r["kept"] for r in results), "failed": sum(r["dropped"] for r in results),
            "cpu": sum(r["cpu"] for r in results), "niceness": results[0]["niceness"]}


def warm_up_ray(server: PhotoServer, photos: list[str], settings: dict, tmp: Path) -> int:
    """Start Ray and run one small task per CPU, so imports and worker start-up are not timed.
    Returns the niceness Ray's workers run at."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_download_partition)
    table = items_table(make_urls(server, photos, 20))
    results = ray.get([remote.remote(table, settings, str(tmp / f"warm-{i}.parquet")) for i in range(2)])
    return results[0]["niceness"]


# ---------------------------------------------------------------- a tool as a process, timed the same way


class TreeCPU:
    """CPU seconds of a process and all its descendants, sampled every ``interval`` seconds
    (each process's last sample counts, so children that exit early still count)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import threading

        self.root, self.interval, self.seen = psutil.Process(pid), interval, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                t = proc.cpu_times()
                self.seen[(proc.pid, proc.create_time())] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def timed_process(cmd: list[str], log: Path, niceness: int | None = None, **kwargs) -> dict:
    """Run ``cmd``; wall clock from just before the process starts to its exit, its CPU seconds."""
    load = os.getloadavg()[0]
    with open(log, "w") as f:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=None if niceness is None else (lambda: os.nice(niceness - os.nice(0))),
                                **kwargs)  # fmt: skip
        cpu = TreeCPU(proc.pid)
        code = proc.wait()
        end = time.time()
    if code != 0:
        raise RuntimeError(f"{cmd[0]} exited {code}; see {log}")
    return {"start": start, "exit_s": end - start, "cpu": cpu.total(), "load": (load, os.getloadavg()[0])}


def newest_mtime(files: list[Path]) -> float | None:
    return max((f.stat().st_mtime for f in files), default=None)


# ---------------------------------------------------------------- img2dataset


def ensure_img2dataset() -> Path:
    python = BENCH_VENV / "bin" / "python"
    subprocess.run(["sh", str(REPO / "benchmarks" / "img2dataset_venv.sh")], check=True)
    return python


def run_img2dataset(python: Path, urls, out_dir: Path, processes: int, threads: int, niceness: int) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    url_list = out_dir.parent / f"{out_dir.name}-urls.txt"
    url_list.write_text("".join(u + "\n" for u, _ in urls))
    driver = out_dir.parent / "img2dataset_driver.py"
    driver.write_text(I2D_DRIVER)
    config = dict(url_list=str(url_list), input_format="txt", output_folder=str(out_dir),
                  output_format="webdataset", processes_count=processes, thread_count=threads,
                  resize_mode="no", skip_reencode=True, number_sample_per_shard=math.ceil(len(urls) / processes),
                  timeout=10, retries=0, compute_hash="sha256", enable_wandb=False,
                  distributor="multiprocessing")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    run = timed_process([str(python), str(driver), json.dumps(config)], out_dir.parent / f"{out_dir.name}.log",
                        niceness, env=env, cwd=out_dir.parent)
    stats = [json.loads(p.read_text()) for p in out_dir.glob("*_stats.json")]
    last = newest_mtime(sorted(out_dir.glob("*.tar")))
    first_shard = min(s["start_time"] for s in stats)
    return {**run, "seconds": last - run["start"], "ok": sum(s["successes"] for s in stats),
            "failed": sum(s["count"] - s["successes"] for s in stats),
            "phases": {"start-up (to its first shard)": first_shard - run["start"],
                       "downloading (first shard start to last tar written)": last - first_shard,
                       "after the last image (exit)": run["exit_s"] - (last - run["start"])}}


# ---------------------------------------------------------------- datakit run (end to end)


def run_datakit_cli(urls, out_dir: Path, tasks: int, settings: dict, partition_size: int | None = None) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    csv = out_dir / "urls.csv"
    csv.write_text("url\n" + "".join(u + "\n" for u, _ in urls))
    stage = {**settings, "concurrency": tasks}
    build = out_dir / "build"
    recipe = {
        "name": "bench-download",
        "output": str(build),
        "sources": [{"name": "bench", "kind": "urls", "path": str(csv), "url_column": "url"}],
        "ray": {"num_cpus": 2, "partition_size": partition_size or math.ceil(len(urls) / tasks)},
        "stages": {"download": stage},
    }
    recipe_path = out_dir / "recipe.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    # started as a user starts it; Ray runs its workers (the downloading) at niceness 15 by itself
    run = timed_process([sys.executable, "-m", "datakit", "run", str(recipe_path), "--quiet"], out_dir / "run.log",
                        cwd=REPO)
    manifest = pq.read_table(build / "images.parquet", columns=["status"])
    status = manifest.column("status").to_pylist()
    parts = [f for f in build.rglob("*.parquet") if "download" in f.relative_to(build).parts[:-1]]
    items = [f for f in build.rglob("*") if f.is_file() and "items" in f.relative_to(build).parts]
    last, first = newest_mtime(parts), min(f.stat().st_mtime for f in parts)
    enumerated = newest_mtime(items) or run["start"]
    return {**run, "seconds": last - run["start"], "ok": status.count("kept"), "failed": status.count("dropped"),
            "manifest": build / "images.parquet",
            "phases": {"start-up and enumeration (to the items file)": enumerated - run["start"],
                       "to the first partition written": first - enumerated,
                       "first to last partition written": last - first,
                       "after the last image (manifests, exit)": run["exit_s"] - (last - run["start"])}}


def verify_datakit(manifest: Path, urls, photo_dir: Path) -> str:
    table = pq.read_table(manifest, columns=["locator", "status", "sha256", "reason", "detail"])
    served = {u: rel for u, rel in urls}
    expected: dict[str, str] = {}
    problems = []
    for row in table.to_pylist():
        rel = served.get(row["locator"])
        if rel is None:
            problems.append(f"{row['locator']}: not one of the URLs")
            continue
        if rel not in expected:
            expected[rel] = hashlib.sha256((photo_dir / rel).read_bytes()).hexdigest()
        if row["status"] != "kept":
            problems.append(f"{row['locator']}: {row['reason']} {row['detail']}")
        elif row["sha256"] != expected[rel]:
            problems.append(f"{row['locator']}: sha256 differs from the served file")
    if table.num_rows != len(urls):
        problems.append(f"{table.num_rows} rows for {len(urls)} URLs")
    return "all rows kept, every sha256 matches" if not problems else f"{len(problems)} problems, e.g. {problems[0]}"


# ---------------------------------------------------------------- report

RAY_NICENESS = 15  # what Ray gives its workers; both tools run at it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3000,20000", help="URLs per run, comma-separated (default 3000,20000)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both tools this many times per size")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos to serve")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "download")
    parser.add_argument("--tasks", type=int, default=2, help="datakit: parallel partitions")
    parser.add_argument("--partition-size", type=int, default=None, help="datakit: items per partition (default: URLs / tasks)")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset: processes")
    parser.add_argument("--threads", type=int, default=32, help="img2dataset: threads per process")
    parser.add_argument("--per-host", type=int, default=16, help="datakit: per_host_concurrency")
    parser.add_argument("--decode-threads", type=int, default=None, help="datakit: decode_threads (default: the stage's)")
    parser.add_argument("--no-img2dataset", action="store_true", help="skip the baseline")
    parser.add_argument("--stage-only", action="store_true",
                        help="also time DownloadStage on already-started Ray tasks (start-up not counted)")
    args = parser.parse_args(argv)

    if not args.photos.is_dir():
        sys.exit(f"photo folder {args.photos} not found (the shared fixtures sit beside the repo); "
                 "pass --photos DIR")
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    photos = list_photos(args.photos)
    settings = {"allow_private_addresses": True, "per_host_concurrency": args.per_host, "full_decode": True}
    if args.decode_threads:
        settings["decode_threads"] = args.decode_threads
    i2d_python = None if args.no_img2dataset else ensure_img2dataset()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, int, dict]] = []
    checks = []
    with PhotoServer(args.photos, in_process=False) as server:
        print(f"{len(photos)} photos from {args.photos}, served at {server.base_url}; sizes {sizes}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        for n in sizes:
            urls = make_urls(server, photos, n)
            for r in range(args.rounds):
                dk = run_datakit_cli(urls, args.out / f"datakit-run-{n}-{r}", args.tasks, settings, args.partition_size)
                rows.append(("datakit run", n, r, dk))
                print(f"{n} URLs, round {r}: datakit run  {dk['ok']}/{n}, last image at {dk['seconds']:.1f} s, exit "
                      f"{dk['exit_s']:.1f} s, load {dk['load'][0]:.1f}->{dk['load'][1]:.1f}", flush=True)
                if r == 0:
                    checks.append(f"{n} URLs: {verify_datakit(dk.pop('manifest'), urls, args.photos)}")
                if i2d_python is not None:
                    i2d = run_img2dataset(i2d_python, urls, args.out / f"img2dataset-{n}-{r}", args.processes,
                                          args.threads, RAY_NICENESS)
                    rows.append(("img2dataset", n, r, i2d))
                    print(f"{n} URLs, round {r}: img2dataset  {i2d['ok']}/{n}, last image at {i2d['seconds']:.1f} s, "
                          f"exit {i2d['exit_s']:.1f} s, load {i2d['load'][0]:.1f}->{i2d['load'][1]:.1f}", flush=True)
        if args.stage_only:
            rows += stage_only(server, photos, urls, args, settings)
    report(rows, args, checks)
    return 0


def stage_only(server, photos, urls, args, settings) -> list:
    """The stage alone on Ray tasks that are already running (ray.init and imports not timed)."""
    import ray

    warm_up_ray(server, photos, settings, args.out)
    dk = run_datakit(urls, args.tasks, args.out / "datakit-stage-only", settings)
    ray.shutdown()
    dk["load"] = (os.getloadavg()[0],) * 2
    return [("stage only (Ray running)", len(urls), 0, dk)]


def report(rows, args, checks: list[str]) -> None:
    def rate(d):
        return d["ok"] / d["seconds"] if d.get("seconds") else float("nan")

    print()
    print(f"download benchmark, end to end: process start to last image written; datakit run ({args.tasks} partitions x 64 "
          f"requests, {args.per_host} per host, full decode) vs img2dataset ({args.processes} processes x {args.threads} "
          f"threads, OpenCV decode); the work at niceness {RAY_NICENESS} in both, on {os.cpu_count()} CPUs")
    print(f"{'tool':26} {'URLs':>6} {'round':>5} {'ok':>6} {'failed':>6} {'to last':>8} {'to exit':>8} {'images/s':>9} "
          f"{'vs i2d':>7} {'cores':>6} {'CPU ms/img':>10} {'load':>10}")
    base = {}
    for name, n, r, d in rows:
        if name == "img2dataset":
            base.setdefault(n, []).append(rate(d))
    for name, n, r, d in rows:
        b = statistics.median(base[n]) if base.get(n) else None
        ratio = f"{rate(d) / b:.2f}x" if b else "-"
        cores = f"{d['cpu'] / d['exit_s']:.2f}" if d.get("exit_s") else "-"
        cpu_ms = f"{1000 * d['cpu'] / d['ok']:.2f}" if d.get("cpu") and d["ok"] else "-"
        exit_s = f"{d['exit_s']:.1f}" if d.get("exit_s") else "-"
        print(f"{name:26} {n:>6} {r:>5} {d['ok']:>6} {d['failed']:>6} {d['seconds']:>8.1f} {exit_s:>8} {rate(d):>9.0f} "
              f"{ratio:>7} {cores:>6} {cpu_ms:>10} {d['load'][0]:>4.1f}->{d['load'][1]:<4.1f}")
    print("where the time goes (seconds, first round):")
    for name, n, r, d in rows:
        if r == 0 and "phases" in d:
            print(f"  {name:12} {n:>6} URLs: " + "; ".join(f"{k} {v:.1f}" for k, v in d["phases"].items()))
    for n in sorted(base):
        ours = [rate(d) for name, m, _, d in rows if name == "datakit run" and m == n]
        if ours:
            ratio = statistics.median(ours) / statistics.median(base[n])
            verdict = "meets" if ratio >= 1.0 else f"misses by {100 * (1 - ratio):.0f}%"
            goal = f" (goal >= 1.0x at 20,000 URLs: {verdict})" if n == 20_000 else ""
            print(f"{n} URLs: datakit run {statistics.median(ours):.0f} images/s = {ratio:.2f}x img2dataset's "
                  f"{statistics.median(base[n]):.0f}{goal}")
    print("cores = CPU seconds of the tool's whole process tree / wall to exit (datakit: driver, Ray daemons and "
          "workers; img2dataset: driver and pool); not the server's")
    for c in checks:
        print(f"datakit check, {c}")


if __name__ == "__main__":
    sys.exit(main())
